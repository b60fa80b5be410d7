"""The methods work, not only run: DreamBooth on toy_sd (the bundled striped star, the
budget of conf/scale/toy_sd.yaml: 500 steps of 4 images at lr 6e-4, cosine) with and without prior
preservation, and the quickstart itself over four seeds, scored by the shipped toy evaluators
against the base model on the same prompts and seeds. About 15 minutes: `slow`.

The with/without comparisons are between runs of this machine, so no absolute value is assumed
there. The quickstart's floor (DINO >= 0.5 in every seed, issue 16) is absolute: toy_dino
scores the subject's own round trips through toy_vae about 0.78, its ceiling here."""

from __future__ import annotations

import json

import pytest
from _support import run_train

pytestmark = pytest.mark.slow

# DreamBooth (Ruiz et al.: the model's own schedule) with the quickstart's budget; two eval
# prompts with 8 images each (and 8 of the class prompt for PRES and prior_div).
SHORT = [
    "experiment=dreambooth",
    "logger=csv",
    "seed=0",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.at_end=false",
    "export.enabled=false",
    "eval.images_per_prompt=8",
    "eval.prompts=['a {identifier} {class_noun}','a {identifier} {class_noun} on a blue background']",
]


def _metrics(run_dir) -> dict[str, float]:
    return json.loads((run_dir / "results.json").read_text())["metrics"]


def _run_jobs(root, jobs: dict[str, tuple[list[str], str]]) -> dict[str, dict[str, float]]:
    """{name: (overrides, script)} run one after another in root/<name>: their metrics."""
    out = {}
    for name, (job_args, script) in jobs.items():
        proc = run_train(job_args, root / name, timeout=600, script=script)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        out[name] = _metrics(root / name)
    return out


def _base_and_dreambooth(root, args: list[str], base_keys: tuple[str, ...]) -> dict:
    """The base model's metrics (evaluate.py with the `base_keys` overrides of `args`), and
    DreamBooth's with and without prior preservation (train.py with `args`)."""
    eval_args = [a for a in args if a.startswith(base_keys)] + ["logger=csv"]
    return _run_jobs(
        root,
        {
            "base": (eval_args, "evaluate.py"),
            "prior": ([*args, "method.prior_preservation=true"], "train.py"),
            "no_prior": ([*args, "method.prior_preservation=false"], "train.py"),
        },
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _base_and_dreambooth(tmp_path_factory.mktemp("toy_learning"), SHORT, ("eval.",))


def test_dreambooth_moves_generations_toward_the_subject(runs):
    """Subject fidelity: DINO and CLIP-I of "a sks star ..." generations rise above the base
    model's (which has never seen the subject). Measured 2026-12-04 on toy_sd's 5000-step
    weights: DINO 0.194 (base) -> 0.686 with the prior loss, 0.542 without; CLIP-I 0.432 ->
    0.603 / 0.544. Without the prior loss the toy budget overfits the four subject images (train
    loss 0.003 against 0.049) and "a star" turns into the subject (PRES 0.71 against the base
    model's 0.16, prior_div 0.44 against 0.89)."""
    base, prior, no_prior = runs["base"], runs["prior"], runs["no_prior"]
    assert prior["dino"] > base["dino"] + 0.2, (prior, base)
    assert prior["clip_i"] > base["clip_i"] + 0.05, (prior, base)
    assert no_prior["dino"] > base["dino"] + 0.03, (no_prior, base)
    assert no_prior["clip_i"] > base["clip_i"] + 0.01, (no_prior, base)


def test_prior_preservation_keeps_the_class_prior(runs):
    """Language drift: fine-tuning narrows what "a star" generates (prior_div, the diversity
    of the class prompt's images, falls below the base model's), and the prior loss holds
    more of it; without it "a star" draws the subject (PRES, the class images' likeness to the
    subject, 0.71 against 0.13 with the prior loss on 2026-12-04; measured above)."""
    base, prior, no_prior = runs["base"], runs["prior"], runs["no_prior"]
    assert no_prior["prior_div"] < base["prior_div"], (no_prior, base)
    assert prior["prior_div"] > no_prior["prior_div"] + 0.2, (prior, no_prior)
    assert prior["pres"] < no_prior["pres"] - 0.2, (prior, no_prior)


# The README's quickstart as typed (`python train.py experiment=dreambooth_sigmoid`), seeds 0-3.
# Measured on 2026-12-04 (2 threads): DINO 0.620 / 0.610 / 0.628 / 0.584 (the base model: 0.251),
# prior_div 0.801 / 0.833 / 0.828 / 0.843 (base 0.887, from 32 images of "a star"). Issue 16's
# floor, asserted in every seed: DINO >= 0.5 and prior_div within 0.1 of the base model's.
QUICKSTART_SEEDS = (0, 1, 2, 3)
DINO_FLOOR = 0.5


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    seeds = {
        f"seed{s}": (["experiment=dreambooth_sigmoid", "logger=csv", f"seed={s}"], "train.py")
        for s in QUICKSTART_SEEDS
    }
    jobs = {"base": (["logger=csv"], "evaluate.py"), **seeds}
    return _run_jobs(tmp_path_factory.mktemp("quickstart"), jobs)


def test_the_quickstart_learns_the_subject_in_every_seed(quickstart):
    base = quickstart["base"]["dino"]
    dino = {s: quickstart[f"seed{s}"]["dino"] for s in QUICKSTART_SEEDS}
    assert all(d >= DINO_FLOOR for d in dino.values()), dino
    assert all(d > base + 0.25 for d in dino.values()), (base, dino)


def test_the_quickstart_keeps_the_class_prompts_variety_in_every_seed(quickstart):
    """prior_div (the diversity of "a star" images) within 0.1 of the base model's: the prior
    loss holds the class while the subject is learnt."""
    base = quickstart["base"]["prior_div"]
    drift = {s: quickstart[f"seed{s}"]["prior_div"] - base for s in QUICKSTART_SEEDS}
    assert all(abs(d) <= 0.1 for d in drift.values()), (base, drift)


# The same on the toy flow-matching model (toy_flux, rectified flow), seed 1: the seed whose
# drift without the prior loss was largest in experiments/dreambooth_prior_flow (PRES 0.215 with
# the prior loss against 0.463 without, prior_div 0.803 against 0.461). The run without the
# prior loss repeats the study's exactly; the one with it draws its own class images (the sweep's
# runs shared those of its first run), so it differs: PRES 0.27, prior_div 0.55 here.
FLOW = [*SHORT[:2], "model=toy_flux", "seed=1", "trainer.cpu_threads=1", *SHORT[3:]]


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_flow_learning")
    return _base_and_dreambooth(root, FLOW, ("eval.", "model=", "seed="))


def test_flow_dreambooth_learns_the_subject_and_the_prior_loss_holds_the_class(flow_runs):
    base, prior, no_prior = flow_runs["base"], flow_runs["prior"], flow_runs["no_prior"]
    assert no_prior["dino"] > base["dino"] + 0.1, (no_prior, base)
    assert prior["dino"] > base["dino"], (prior, base)
    # Without the prior loss "a star" drifts toward the subject and narrows; with it, it holds.
    assert prior["pres"] < no_prior["pres"] - 0.1, (prior, no_prior)
    assert prior["prior_div"] > no_prior["prior_div"], (prior, no_prior)
