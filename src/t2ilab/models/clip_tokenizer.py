"""Offline rebuild of the CLIP text tokenizer used by Stable Diffusion v1.

SD v1 ships `openai/clip-vit-large-patch14`'s tokenizer (a `vocab.json` + `merges.txt` pair). Both
files are fully determined by OpenAI's BPE merges file, which we vendor under
`t2ilab/assets/clip_bpe`, so tests and CPU runs can tokenize prompts with the real ids without
reaching the Hugging Face Hub.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_PATH = (
    Path(__file__).resolve().parents[1] / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
)

# Same numbers as CLIP's SimpleTokenizer: the merges file holds more merges than the vocabulary
# uses; CLIP keeps the first 49152 - 256 - 2 so that 2 * 256 byte tokens + merges + 2 special
# tokens give a vocabulary of 49408.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Files we generate; all must exist for a cache dir to be reused.
_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode char map (order matters: it defines ids 0..255)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """Build (token -> id, merges) exactly as CLIP's SimpleTokenizer does."""
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is the "#version" header; keep exactly NUM_MERGES merges after it.
    merges = tuple(lines[1 : NUM_MERGES + 1])
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    # A duplicate token would silently shift every later id.
    if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocab rebuilt with {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab, merges


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "t2ilab" / "clip_tokenizer"


def _write_tokenizer_files(target: Path) -> None:
    vocab, merges = _vocab_and_merges()
    contents = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        # HF's merges.txt for openai/clip-vit-large-patch14 starts with this header line.
        "merges.txt": "\n".join(["#version: 0.2", *merges]) + "\n",
        # Same special tokens as SD v1's tokenizer_config.json, so AutoTokenizer can load it too.
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": BOS_TOKEN,
                "eos_token": EOS_TOKEN,
                "unk_token": EOS_TOKEN,
                "pad_token": EOS_TOKEN,
                "do_lower_case": True,
            },
            indent=2,
        ),
    }
    target.mkdir(parents=True, exist_ok=True)
    # Write everything into a temp dir next to the target, then rename file by file: each file
    # appears complete or not at all, so concurrent builders (e.g. DDP ranks) never read a half
    # file. Renaming files rather than the dir also works when `target` already exists (empty).
    tmp_dir = Path(tempfile.mkdtemp(prefix=".clip_tokenizer-", dir=target.parent))
    try:
        for name, text in contents.items():
            (tmp_dir / name).write_text(text, encoding="utf-8")
        # tokenizer_config.json goes last: `_is_complete` needs all files, it is the commit marker.
        for name in _FILES:
            os.replace(tmp_dir / name, target / name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _is_complete(target: Path) -> bool:
    return all((target / name).is_file() for name in _FILES)


def build_clip_tokenizer(
    cache_dir: str | os.PathLike | None = None, model_max_length: int = 77
) -> CLIPTokenizer:
    """Return SD v1's CLIP tokenizer (`openai/clip-vit-large-patch14`), built offline.

    Args:
        cache_dir: folder for the generated `vocab.json` / `merges.txt`; reused when already
            filled. Defaults to `$XDG_CACHE_HOME/t2ilab/clip_tokenizer` (`~/.cache/...`).
        model_max_length: padding / truncation length; 77 is CLIP's text context length.
    """
    target = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    if not _is_complete(target):
        _write_tokenizer_files(target)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(target),
        model_max_length=model_max_length,
        pad_token=EOS_TOKEN,
        local_files_only=True,
    )
    # Cheap guard against a cache dir holding some other tokenizer's files.
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(
            f"{target} holds a tokenizer with {len(tokenizer)} tokens, expected {VOCAB_SIZE}; "
            "delete that folder to rebuild it."
        )
    return tokenizer
