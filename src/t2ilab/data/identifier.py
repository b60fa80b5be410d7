"""Rare-token subject identifiers for DreamBooth ("a photo of [V] dog").

DreamBooth (Ruiz et al., 2023, sec. 4.1 "Rare-token identifiers") binds the subject to a word that
the text encoder knows little about: it looks up rare tokens in the vocabulary (short, no spaces,
in a fixed id range) and inverts them to text. Common words ("dog") or random letter strings that
split into several common tokens ("xxy5syt00") keep a strong prior that fine-tuning must unlearn.
"""

from __future__ import annotations

import random
import re

from t2ilab.errors import UserError

# CLIP BPE marks the end of a word with a "</w>" suffix; SentencePiece (T5) marks its start
# with "▁". Either way the token is a whole word, not a piece glued to its neighbours.
_WORD_END = "</w>"
_WORD_START = "▁"


def _word_of(token: str) -> str | None:
    """Text of a whole-word vocab token, or None if the token is a word piece."""
    if token.endswith(_WORD_END):
        return token[: -len(_WORD_END)]
    if token.startswith(_WORD_START):
        return token[len(_WORD_START) :]
    return None


def identifier_token_count(tokenizer, identifier: str) -> int:
    """Number of tokens `identifier` takes in prompts (special tokens excluded)."""
    return len(tokenizer(identifier, add_special_tokens=False)["input_ids"])


def pick_rare_identifier(
    tokenizer, seed: int, id_range: tuple[int, int] = (5000, 10000), max_chars: int = 3
) -> str:
    """Deterministically pick a rare-token identifier such as "sks" from `tokenizer`'s vocab.

    Candidates are ids in `[id_range[0], id_range[1])` whose token is a whole word of 1 to
    `max_chars` lowercase ASCII letters that tokenizes back to exactly that single id. The choice
    is `random.Random(seed).choice` over the sorted candidates, so a seed always gives the same
    word for the same tokenizer.
    """
    start, stop = id_range
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    words = {}
    for token_id in range(start, stop):
        word = _word_of(id_to_token.get(token_id, ""))
        if word and len(word) <= max_chars and word.isascii() and word.isalpha() and word.islower():
            words[word] = token_id

    # The vocab string alone is not enough: the text must come back as that one token when it
    # appears in a prompt (e.g. a merge order that splits it, or tokenizer normalization).
    candidates = []
    if words:
        encoded = tokenizer(list(words), add_special_tokens=False)["input_ids"]
        candidates = [w for w, ids in zip(words, encoded, strict=True) if ids == [words[w]]]
    if not candidates:
        raise ValueError(
            f"No rare-token identifier found: no token id in [{start}, {stop}) is a whole word of "
            f"1-{max_chars} lowercase ASCII letters that encodes to a single token. Widen id_range "
            "or max_chars, or set the identifier explicitly."
        )
    return random.Random(seed).choice(sorted(candidates))


def validate_identifier_in_prompt(prompt: str, identifier: str) -> None:
    """Raise ValueError unless `identifier` occurs in `prompt` as a whole word.

    "a photo of sks dog" passes for "sks"; "a photo of sksdog" does not, since the glued word
    tokenizes differently and the subject would never be bound to the identifier.
    """
    if not identifier or any(c.isspace() for c in identifier):
        raise ValueError(
            f"Identifier must be one non-empty word without spaces, got {identifier!r}."
        )
    # Lookarounds rather than `\b`, which would misbehave for identifiers ending in punctuation.
    pattern = rf"(?<!\w){re.escape(identifier)}(?!\w)"
    if re.search(pattern, prompt) is None:
        raise ValueError(
            f"Identifier {identifier!r} is not a whole word of the instance prompt {prompt!r}; "
            f"write it as a separate word, e.g. 'a photo of {identifier} <class noun>'."
        )


def check_identifier_tokens(tokenizer, identifier: str) -> None:
    """The identifier must reach the text encoder as itself: a token the tokenizer does not know
    becomes its unknown token, which every unknown word shares."""
    ids = tokenizer.encode(identifier, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    known = [i for i in ids if i != unk] if unk is not None else ids
    if not ids or len(known) < len(ids):
        raise UserError(
            f"data.identifier={identifier!r} is unknown to the model's tokenizer (it becomes "
            f"{tokenizer.unk_token!r}, as every unknown word does): pick a word of plain letters, "
            "e.g. sks, or leave data.identifier empty to pick a rare token"
        )


def check_prompt_fits(tokenizer, prompt: str, key: str) -> None:
    """A prompt longer than the text encoder reads is cut off, and with it maybe the identifier."""
    count = len(tokenizer(prompt, add_special_tokens=True, verbose=False).input_ids)
    if count > tokenizer.model_max_length:
        shown = prompt if len(prompt) <= 60 else f"{prompt[:57]}..."
        raise UserError(
            f"{key}={shown!r} is {count} tokens, more than the {tokenizer.model_max_length} the "
            "text encoder reads: its end would be cut off; shorten it"
        )
