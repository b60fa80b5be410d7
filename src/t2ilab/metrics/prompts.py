"""Evaluation prompts: pick the DreamBooth prompt list from `conf/eval/*.yaml` and fill it in.

Templates use `{identifier}` (the rare token) and `{class_noun}`, the same placeholders as
`data.instance_prompt_template`, so one identifier/class pair fills every prompt in a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from t2ilab.errors import UserError

# subject_type -> the eval config key holding its list (the paper's two 25-prompt lists)
PROMPT_LISTS = {"object": "object_prompts", "live": "live_subject_prompts"}


def select_prompts(eval_cfg: Mapping) -> list[str]:
    """The prompt templates to evaluate: `prompts` when set, else the list for `subject_type`."""
    prompts = eval_cfg.get("prompts")
    subject_type = eval_cfg.get("subject_type", "object")
    if subject_type not in PROMPT_LISTS:  # checked even with explicit prompts: a typo is a typo
        raise UserError(
            f"eval.subject_type={subject_type!r} is not one of "
            f"{' | '.join(PROMPT_LISTS)} (object: things like a backpack or a teapot; "
            "live: pets and other live subjects)"
        )
    if prompts is None:
        key = PROMPT_LISTS[subject_type]
        prompts = eval_cfg.get(key)
        if prompts is None:
            raise UserError(f"eval.{key} is missing: the eval config holds no prompt list")
        source = f"eval.{key}"
    else:
        source = "eval.prompts"
    if isinstance(prompts, str):
        raise UserError(f"{source} must be a list of prompt templates, got one string: {prompts!r}")
    templates = list(prompts)
    if not templates:
        raise UserError(f"{source} is empty: give at least one prompt template")
    bad = [t for t in templates if not isinstance(t, str) or not t.strip()]
    if bad:
        raise UserError(
            f"{source} holds {bad[0]!r}: every prompt template must be a non-empty string"
        )
    return templates


def format_prompts(templates: Iterable[str], identifier: str, class_noun: str) -> list[str]:
    """Fill `{identifier}` and `{class_noun}` in each template.

    An empty identifier (class-only prompts) leaves no double space: whitespace is normalised.
    """
    prompts = []
    for template in templates:
        try:
            text = template.format(identifier=identifier, class_noun=class_noun)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(
                f"prompt template {template!r} cannot be filled ({type(e).__name__}: {e}); "
                "use only {identifier} and {class_noun}, and {{ }} for literal braces"
            ) from None
        prompts.append(" ".join(text.split()))
    return prompts
