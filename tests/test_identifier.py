"""DreamBooth rare-token identifier selection and prompt validation."""

import pytest

from t2ilab.data.identifier import (
    identifier_token_count,
    pick_rare_identifier,
    validate_identifier_in_prompt,
)
from t2ilab.models.clip_tokenizer import build_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


def test_same_seed_same_identifier(tokenizer):
    assert pick_rare_identifier(tokenizer, seed=0) == pick_rare_identifier(tokenizer, seed=0)
    # Pinned: configs and checkpoints name the identifier, so a silent change would orphan them.
    assert [pick_rare_identifier(tokenizer, seed=s) for s in range(5)] == [
        "sch",
        "fed",
        "bu",
        "lb",
        "lap",
    ]


def test_seeds_vary(tokenizer):
    assert len({pick_rare_identifier(tokenizer, seed=s) for s in range(10)}) > 1


@pytest.mark.parametrize("seed", range(5))
def test_identifier_is_short_rare_single_token(tokenizer, seed):
    word = pick_rare_identifier(tokenizer, seed=seed)
    assert 1 <= len(word) <= 3
    assert word.isascii() and word.isalpha() and word.islower()
    ids = tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) == 1
    assert 5000 <= ids[0] < 10000
    assert tokenizer.convert_ids_to_tokens(ids[0]) == word + "</w>"
    assert identifier_token_count(tokenizer, word) == 1


def test_custom_range_and_max_chars(tokenizer):
    word = pick_rare_identifier(tokenizer, seed=1, id_range=(40000, 49406), max_chars=2)
    (token_id,) = tokenizer(word, add_special_tokens=False).input_ids
    assert 40000 <= token_id < 49406 and len(word) <= 2


def test_no_candidates_raises(tokenizer):
    # Single letters live at ids 256..511, so none is in the default range.
    with pytest.raises(ValueError, match="No rare-token identifier"):
        pick_rare_identifier(tokenizer, seed=0, max_chars=1)
    with pytest.raises(ValueError, match="No rare-token identifier"):
        pick_rare_identifier(tokenizer, seed=0, id_range=(49406, 49408))


class _SplittingTokenizer:
    """Vocab says "abc" is one word, but the tokenizer splits it: it must not be picked."""

    vocab = {"abc</w>": 10, "xyz</w>": 11, "ab": 12, "c</w>": 13}

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, text, add_special_tokens=True):
        encode = {"abc": [12, 13], "xyz": [11], "c": [13]}
        ids = [encode[t] for t in text] if isinstance(text, list) else encode[text]
        return {"input_ids": ids}


def test_candidates_must_round_trip():
    tok = _SplittingTokenizer()
    assert {pick_rare_identifier(tok, seed=s, id_range=(0, 20)) for s in range(20)} == {"c", "xyz"}


def test_token_count(tokenizer):
    assert identifier_token_count(tokenizer, "sks") == 1
    # The DreamBooth paper's example of a bad identifier: random letters split into many tokens.
    assert identifier_token_count(tokenizer, "xxy5syt00") > 1


def test_validate_identifier_in_prompt():
    validate_identifier_in_prompt("a photo of sks dog", "sks")
    validate_identifier_in_prompt("sks dog on the beach", "sks")
    for prompt in ["a photo of dog", "a photo of sksdog", "a photo of asks dog"]:
        with pytest.raises(ValueError) as err:
            validate_identifier_in_prompt(prompt, "sks")
        message = str(err.value)
        assert "\n" not in message
        assert "'sks'" in message and "a photo of sks <class noun>" in message
    with pytest.raises(ValueError):
        validate_identifier_in_prompt("a photo of sks dog", "")


def test_an_identifier_the_tokenizer_does_not_know_is_refused():
    """A SentencePiece tokenizer maps unknown characters to <unk>, which every unknown word
    shares: such an identifier would not identify anything."""
    from t2ilab.data.identifier import check_identifier_tokens
    from t2ilab.errors import UserError

    class Tokenizer:
        unk_token, unk_token_id = "<unk>", 2

        def encode(self, text, add_special_tokens=False):
            return [7 if ch.isascii() else 2 for ch in text]

    check_identifier_tokens(Tokenizer(), "sks")
    with pytest.raises(UserError, match=r"data.identifier='s✓s' is unknown to the model's tok"):
        check_identifier_tokens(Tokenizer(), "s✓s")
