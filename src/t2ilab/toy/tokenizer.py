"""A small CLIP tokenizer for the toy world: CLIP's format and rules, a vocabulary of ~1000.

The real CLIP BPE has 49408 tokens, so its embedding table alone (49408 x width) would dwarf a
toy text encoder. This one keeps CLIP's layout and pre-processing exactly (byte-level BPE,
lower-case, `</w>` end-of-word suffix; ids 0-255 the byte symbols, 256-511 the same with `</w>`,
then one token per merge, `<|startoftext|>` and `<|endoftext|>` last), so `CLIPTokenizer` and
`AutoTokenizer` load it and any text still tokenizes (unknown words fall back to characters).
Its merges are built, not learned: every word in `WORDS` becomes exactly one token.

`RARE_IDENTIFIERS` are DreamBooth identifiers: single tokens that no training caption ever
contains, so their embeddings stay untrained, like "sks" in the real CLIP. They are built last,
so their ids are the highest before the two special tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import CLIPTokenizer

from t2ilab.models.clip_tokenizer import BOS_TOKEN, EOS_TOKEN, _bytes_to_unicode
from t2ilab.toy.world import BACKGROUNDS, COLORS, PATTERNS, POSITIONS, SHAPES, SIZES

# Words of the toy world's captions (`dense_caption`, `class_caption`, subject descriptions).
CAPTION_GLUE = ("a", "an", "on", "with", "and", "background", "dot")
WORLD_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *CAPTION_GLUE,
            *SHAPES,
            *COLORS,
            *BACKGROUNDS,
            *SIZES,
            *(word for position in POSITIONS for word in position.split()),
            *PATTERNS,
        ]
    )
)

# The DreamBooth evaluation prompts (conf/eval/dreambooth.yaml, both lists), the sample-grid
# prompts, and a few other common prompt words: each one token, as most are in the real CLIP.
PROMPT_WORDS: tuple[str, ...] = (
    # DreamBooth object and live-subject prompt lists
    "in", "the", "jungle", "snow", "beach", "cobblestone", "street", "top", "of", "pink",
    "fabric", "wooden", "floor", "city", "mountain", "blue", "house", "purple", "rug", "forest",
    "wheat", "field", "tree", "autumn", "leaves", "eiffel", "tower", "floating", "water",
    "ocean", "milk", "green", "grass", "sunflowers", "around", "it", "mirror", "sidewalk",
    "crowded", "dirt", "road", "white", "red", "shiny", "wet", "cube", "shaped", "wearing",
    "hat", "santa", "rainbow", "scarf", "black", "monocle", "chef", "outfit", "firefighter",
    "police", "glasses", "yellow", "shirt", "wizard",
    # sample grids and common prompt words
    "photo", "picture", "image", "drawing", "painting", "rendering", "toy", "object", "shape",
    "is", "at", "by", "for", "from", "to", "under", "near", "next", "front", "behind", "big",
    "tiny", "bright", "dark", "light", "colorful", "simple", "style", "close", "up", "view",
    "two", "one", "three", "single", "dog", "cat",
)  # fmt: skip

# DreamBooth identifiers: never in a training caption, built last.
RARE_IDENTIFIERS: tuple[str, ...] = ("sks", "zwx", "qpv", "vkb")

WORDS: tuple[str, ...] = tuple(dict.fromkeys([*WORLD_WORDS, *PROMPT_WORDS]))

# Long enough for every toy caption (the longest subject caption is 22 tokens with the two
# specials) and every DreamBooth prompt; the diffusion pipeline pads to this length.
MODEL_MAX_LENGTH = 32
END_OF_WORD = "</w>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case word: repeatedly merge the lowest-ranked adjacent pair."""
    symbols = [*word[:-1], word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        rank, i = min(
            (ranks.get(pair, math.inf), i)
            for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))
        )
        if rank == math.inf:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_vocab_and_merges(
    words: tuple[str, ...] = WORDS, rare: tuple[str, ...] = RARE_IDENTIFIERS
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte symbols, then for each word (in order) the merges that join what the earlier merges
    leave of it, left to right. Later merges rank after every earlier one, so they never change
    how an earlier word tokenizes (its own merges always win): each word ends as one token.
    The rare identifiers' final merges come last of all, so their ids are contiguous."""
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols]
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []

    def join(word: str, leave: int) -> None:
        pieces = _bpe(word, ranks)
        while len(pieces) > leave:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            tokens.append(pieces[0])

    for word in words:
        join(word, leave=1)
    for word in rare:  # all but the last merge of each identifier ...
        join(word, leave=2)
    for word in rare:  # ... then the merges that complete them
        join(word, leave=1)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def build_toy_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """The toy CLIP tokenizer, in memory (deterministic: the same ids on every machine)."""
    vocab, merges = build_vocab_and_merges()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    for word in (*WORDS, *RARE_IDENTIFIERS):
        if len(tokenizer.tokenize(word)) != 1:  # a guard on the construction above
            raise RuntimeError(f"toy tokenizer splits {word!r}: {tokenizer.tokenize(word)}")
    return tokenizer


def save_toy_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> None:
    """`tokenizer.json` + `tokenizer_config.json` (transformers 5) and CLIP's `vocab.json` +
    `merges.txt` (what transformers 4's CLIPTokenizer reads)."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    vocab, merges = build_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def rare_identifier_ids(tokenizer) -> dict[str, int]:
    return {word: tokenizer.convert_tokens_to_ids(word + END_OF_WORD) for word in RARE_IDENTIFIERS}
