"""The offline CLIP tokenizer must match SD v1's (openai/clip-vit-large-patch14) id for id."""

import json

import pytest
from transformers import CLIPTokenizer

from t2ilab.models.clip_tokenizer import build_clip_tokenizer

# Ids of the real openai/clip-vit-large-patch14 tokenizer.
KNOWN_IDS = {
    "<|startoftext|>": 49406,
    "<|endoftext|>": 49407,
    "a</w>": 320,
    "photo</w>": 1125,
    "of</w>": 539,
    "dog</w>": 1929,
    "sks</w>": 48136,
}
PROMPT_IDS = [49406, 320, 1125, 539, 48136, 1929, 49407]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("clip_tokenizer")


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return build_clip_tokenizer(cache_dir)


def test_known_ids(tokenizer):
    for token, token_id in KNOWN_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    assert tokenizer("a photo of sks dog").input_ids == PROMPT_IDS
    # CLIP lowercases and collapses whitespace before BPE.
    assert tokenizer("A  Photo of SKS dog").input_ids == PROMPT_IDS


def test_vocab_layout(tokenizer, cache_dir):
    assert len(tokenizer) == 49408
    assert tokenizer.vocab_size == 49408
    # Byte tokens, then byte tokens + "</w>", then one token per merge, then the 2 specials.
    expected = ["!", "!</w>", "in", "jekyll</w>"]
    assert tokenizer.convert_ids_to_tokens([0, 256, 512, 49405]) == expected

    vocab = json.loads((cache_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    merges = (cache_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[:2] == ["#version: 0.2", "i n"]
    assert len(merges) == 1 + 49152 - 256 - 2


def test_special_tokens_and_padding(tokenizer):
    assert tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token_id == 49407
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == 49407
    assert tokenizer.model_max_length == 77
    ids = tokenizer(
        "a photo of sks dog", padding="max_length", truncation=True, max_length=77
    ).input_ids
    assert len(ids) == 77
    assert ids[: len(PROMPT_IDS)] == PROMPT_IDS
    assert set(ids[len(PROMPT_IDS) :]) == {49407}
    long_ids = tokenizer(" ".join(["dog"] * 200), truncation=True).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == 49407


def test_decode_round_trip(tokenizer):
    # Words only: CLIP decodes punctuation with a space before it ("table , high").
    for text in ["a photo of sks dog", "a red star toy on a wooden table in sunlight"]:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_cache_is_reused(cache_dir, tokenizer):
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    assert {"vocab.json", "merges.txt"} <= set(before)
    again = build_clip_tokenizer(cache_dir)
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == before
    assert again("a photo of sks dog").input_ids == PROMPT_IDS
    # No temp dirs left behind next to the cache.
    assert not [p for p in cache_dir.parent.iterdir() if p.name.startswith(".clip_tokenizer-")]


def test_default_cache_dir_and_max_length(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tok = build_clip_tokenizer(model_max_length=32)
    assert (tmp_path / "t2ilab" / "clip_tokenizer" / "vocab.json").is_file()
    assert tok.model_max_length == 32
    assert len(tok("a dog", padding="max_length").input_ids) == 32


def test_save_pretrained_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded("a photo of sks dog").input_ids == PROMPT_IDS
    assert reloaded.pad_token_id == 49407
    assert reloaded.model_max_length == 77
