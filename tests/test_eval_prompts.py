"""conf/eval/dreambooth.yaml holds the DreamBooth paper's two prompt lists, verbatim."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from t2ilab.metrics.prompts import format_prompts, select_prompts

CONF = Path(__file__).resolve().parents[1] / "conf" / "eval"

SHARED = [
    "in the jungle",
    "in the snow",
    "on the beach",
    "on a cobblestone street",
    "on top of pink fabric",
    "on top of a wooden floor",
    "with a city in the background",
    "with a mountain in the background",
    "with a blue house in the background",
    "on top of a purple rug in a forest",
]
PROPERTIES = ["red", "purple", "shiny", "wet", "cube shaped"]


@pytest.fixture(scope="module")
def cfg():
    return OmegaConf.load(CONF / "dreambooth.yaml")


@pytest.mark.parametrize("key", ["object_prompts", "live_subject_prompts"])
def test_lists_have_25_unique_templates(cfg, key):
    prompts = list(cfg[key])
    assert len(prompts) == 25
    assert len(set(prompts)) == 25
    for p in prompts:
        assert p.count("{identifier}") == 1 and p.count("{class_noun}") == 1
        assert "{identifier} {class_noun}" in p
        assert p.startswith("a ") and p == p.strip() and "  " not in p
    # the shared backgrounds first, the five properties last
    assert prompts[:10] == [f"a {{identifier}} {{class_noun}} {s}" for s in SHARED]
    assert prompts[20:] == [f"a {p} {{identifier}} {{class_noun}}" for p in PROPERTIES]


def test_lists_differ_only_in_the_middle(cfg):
    obj, live = list(cfg.object_prompts), list(cfg.live_subject_prompts)
    assert obj[:10] == live[:10] and obj[20:] == live[20:]
    assert not set(obj[10:20]) & set(live[10:20])
    assert "a {identifier} {class_noun} with the Eiffel Tower in the background" in obj
    assert "a {identifier} {class_noun} floating in an ocean of milk" in obj
    assert "a {identifier} {class_noun} wearing a santa hat" in live
    assert "a {identifier} {class_noun} wearing a black top hat and a monocle" in live
    assert live[19] == "a {identifier} {class_noun} in a purple wizard outfit"


def test_defaults(cfg):
    assert cfg.subject_type == "object"
    assert cfg.prompts is None
    assert cfg.images_per_prompt == 4
    assert cfg.prior_prompt == "a {class_noun}"
    assert OmegaConf.load(CONF / "none.yaml").enabled is False


def test_select_prompts_by_subject_type(cfg):
    assert select_prompts(cfg) == list(cfg.object_prompts)
    live = OmegaConf.merge(cfg, {"subject_type": "live"})
    assert select_prompts(live) == list(cfg.live_subject_prompts)
    # plain dicts work as well as DictConfig
    assert select_prompts({"subject_type": "live", "live_subject_prompts": ["x {class_noun}"]}) == [
        "x {class_noun}"
    ]


def test_select_prompts_explicit_list_wins(cfg):
    mine = OmegaConf.merge(cfg, {"subject_type": "live", "prompts": ["a {identifier} toy"]})
    assert select_prompts(mine) == ["a {identifier} toy"]


def test_select_prompts_unknown_subject_type(cfg):
    bad = OmegaConf.merge(cfg, {"subject_type": "animal"})
    with pytest.raises(ValueError, match="'animal'") as info:
        select_prompts(bad)
    assert "object" in str(info.value) and "live" in str(info.value)


@pytest.mark.parametrize("prompts", [[], "a {identifier} {class_noun}", ["ok", ""]])
def test_select_prompts_rejects_bad_lists(prompts):
    with pytest.raises(ValueError, match="eval.prompts"):
        select_prompts({"prompts": prompts})


def test_format_prompts(cfg):
    prompts = format_prompts(cfg.live_subject_prompts, "sks", "dog")
    assert len(prompts) == 25
    assert prompts[0] == "a sks dog in the jungle"
    assert "a sks dog wearing a santa hat" in prompts
    assert prompts[-1] == "a cube shaped sks dog"
    assert format_prompts([cfg.prior_prompt], "sks", "dog") == ["a dog"]
    # no identifier: no double space left behind
    assert format_prompts(["a {identifier} {class_noun} in the snow"], "", "dog") == [
        "a dog in the snow"
    ]
    assert format_prompts(["{{literal}} {class_noun}"], "sks", "cat") == ["{literal} cat"]


def test_format_prompts_unknown_placeholder():
    with pytest.raises(ValueError, match=r"\{subject\}|subject"):
        format_prompts(["a {subject} in the snow"], "sks", "dog")
