"""The position factors: names, merges, the pinned validity matrix, config validation."""

from __future__ import annotations

import pytest
from adapter_testlib import tiny_unet

from t2ilab.adapters import (
    INPUT_POSITIONS,
    OUTPUT_POSITIONS,
    PAPER_PAIRS,
    AdapterConfig,
    InvalidAdapterPair,
    attach_adapters,
    valid_pairs,
    validate_pair,
    validity_matrix,
)
from t2ilab.errors import UserError

# Rows: the 10 input positions; columns: the 7 distinct output positions
#            SA_in CA_in CA_c FFN_in Trans_out Res_in Res_out
MATRIX = {
    "SA_in":     "1     1     0    1      1         0      0",
    "SA_out":    "0     1     0    1      1         0      0",
    "CA_in":     "0     1     0    1      1         0      0",
    "CA_c":      "1     1     1    1      1         0      0",
    "CA_out":    "0     0     0    1      1         0      0",
    "FFN_in":    "0     0     0    1      1         0      0",
    "FFN_out":   "0     0     0    0      1         0      0",
    "Trans_out": "0     0     0    0      1         0      0",
    "Res_in":    "0     0     0    0      0         1      1",
    "Res_out":   "0     0     0    0      0         0      1",
}  # fmt: skip


def test_positions_are_the_papers():
    assert INPUT_POSITIONS == (
        "SA_in", "SA_out", "CA_in", "CA_c", "CA_out", "FFN_in", "FFN_out", "Trans_out",
        "Res_in", "Res_out",
    )  # fmt: skip
    assert OUTPUT_POSITIONS == (
        "SA_in",
        "CA_in",
        "CA_c",
        "FFN_in",
        "Trans_out",
        "Res_in",
        "Res_out",
    )


def test_validity_matrix_is_pinned():
    expected = {
        (i, o): flag == "1"
        for i, row in MATRIX.items()
        for o, flag in zip(OUTPUT_POSITIONS, row.split(), strict=True)
    }
    assert validity_matrix() == expected
    assert len(valid_pairs()) == 24


def test_paper_pairs_are_valid_and_the_extension_is_pooled_context():
    assert len(PAPER_PAIRS) == 20
    assert PAPER_PAIRS <= set(valid_pairs())
    extra = set(valid_pairs()) - PAPER_PAIRS
    assert extra == {
        ("CA_c", "SA_in"),
        ("CA_c", "CA_in"),
        ("CA_c", "FFN_in"),
        ("CA_c", "Trans_out"),
    }
    assert "mean-pooled" in validate_pair("CA_c", "FFN_in")[1]
    assert AdapterConfig("CA_out", "FFN_in").in_paper
    assert not AdapterConfig("CA_c", "FFN_in").in_paper


@pytest.mark.parametrize(
    "inp, out, words",
    [
        ("CA_out", "SA_in", "before input CA_out"),
        ("Trans_out", "FFN_in", "before input Trans_out"),
        ("FFN_out", "CA_in", "needed before its input exists"),
        ("Res_out", "Res_in", "before input Res_out"),
        ("Res_in", "FFN_in", "same kind of block"),
        ("SA_in", "Res_out", "same kind of block"),
        ("CA_out", "CA_c", "only pairs with input CA_c"),
        ("SA_in", "CA_c", "only pairs with input CA_c"),
        ("CA_x", "CA_in", "Unknown adapter input position 'CA_x'"),
        ("CA_in", "nowhere", "Unknown adapter output position 'nowhere'"),
    ],
)
def test_invalid_pairs_say_why(inp, out, words):
    ok, reason = validate_pair(inp, out)
    assert not ok and words in reason and reason.endswith(".")
    with pytest.raises(InvalidAdapterPair, match=words.split("'")[0]):
        AdapterConfig(inp, out)


def test_attach_raises_invalid_pair_even_for_a_mutated_config():
    cfg = AdapterConfig("CA_out", "FFN_in")
    object.__setattr__(cfg, "output_position", "SA_in")  # bypass the frozen dataclass
    unet = tiny_unet()
    with pytest.raises(InvalidAdapterPair, match="before input CA_out"):
        attach_adapters(unet, cfg)
    with pytest.raises(InvalidAdapterPair):
        attach_adapters(unet, {"input_position": "Res_in", "output_position": "CA_in"})
    assert issubclass(InvalidAdapterPair, ValueError) and issubclass(InvalidAdapterPair, UserError)


@pytest.mark.parametrize(
    "given, stored",
    [
        (("CA_out", "FFN_in"), ("CA_out", "FFN_in")),
        (("ca_in", "sa_out"), ("CA_in", "CA_in")),  # SA_out as output is CA_in
        (("SA_in", "CA_out"), ("SA_in", "FFN_in")),  # CA_out as output is FFN_in
        (("FFN_in", "FFN_out"), ("FFN_in", "Trans_out")),  # FFN_out as output is Trans_out
        (("attn2o", "ffni"), ("CA_out", "FFN_in")),  # the official code's names
        (("attn2c", "attn2c"), ("CA_c", "CA_c")),
        (("resi", "reso"), ("Res_in", "Res_out")),
    ],
)
def test_names_are_normalised_and_merged(given, stored):
    cfg = AdapterConfig(*given)
    assert (cfg.input_position, cfg.output_position) == stored
    ok, reason = validate_pair(*given)
    assert ok
    if given[1].lower() in ("sa_out", "ca_out", "ffn_out"):
        assert "as an output is the same as" in reason


def test_config_defaults_and_derived_fields():
    cfg = AdapterConfig()
    assert (cfg.input_position, cfg.output_position) == ("CA_out", "FFN_in")  # the paper's best
    assert (cfg.rank, cfg.activation, cfg.scale, cfg.targets) == (60, "relu", 1.0, "transformer")
    res = AdapterConfig("Res_in", "Res_out")
    assert (res.rank, res.targets) == (3, "resblock")
    assert AdapterConfig(activation="sig").activation == "sigmoid"
    assert AdapterConfig(activation="Identity").activation == "identity"
    assert AdapterConfig(scale=2).scale == 2.0
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["targets"] == "transformer"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"activation": "gelu"}, "Unknown adapter activation"),
        ({"rank": 0}, "positive integer"),
        ({"rank": 2.5}, "positive integer"),
        ({"scale": float("nan")}, "finite number"),
        ({"scale": "big"}, "finite number"),
        ({"block_filter": "up_blocks[("}, "not a valid regex"),
    ],
)
def test_bad_config_values_are_user_errors(kwargs, words):
    with pytest.raises(UserError, match=words):
        AdapterConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(UserError, match="Unknown adapter config keys"):
        AdapterConfig.from_dict({"input_position": "CA_out", "mid_dim": 60})
