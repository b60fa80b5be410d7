"""Every data config's datamodule answers every call train.py makes (no hasattr probes), and
every data config has the same data.cache block, whose defaults are the code's."""

from __future__ import annotations

from dataclasses import asdict

import hydra
import pytest
from _support import CONF, compose_cfg
from omegaconf import OmegaConf

from t2ilab.data.base import T2IDataModule
from t2ilab.errors import UserError
from t2ilab.models.clip_tokenizer import build_clip_tokenizer
from t2ilab.toy.world import SHAPES

DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
CLASS_CONDITIONAL = {"class_folder", "toy_world_classes"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _datamodule(name: str, tmp_path, *overrides: str):
    cfg = compose_cfg([f"data={name}", *overrides], tmp_path)
    return hydra.utils.instantiate(cfg.data)


def test_every_data_config_is_covered():
    assert set(DATA) == {
        "captioned",
        "class_folder",
        "dreambooth",
        "pixart_captions",
        "toy_world",
        "toy_world_classes",
    }


@pytest.mark.parametrize("name", DATA)
def test_the_cache_block_is_the_same_everywhere_and_the_code_s_defaults(name):
    yaml = OmegaConf.load(CONF / "data" / f"{name}.yaml")
    cls = hydra.utils.get_class(yaml._target_)
    assert issubclass(cls, T2IDataModule)
    assert not {"cache_latents", "cache_text", "cache_dir"} & set(yaml)
    assert OmegaConf.to_container(yaml.cache) == asdict(cls.CACHE)
    # A config's defaults never need a caching the class refuses.
    assert all(not getattr(cls.CACHE, kind) or kind in cls.CACHES for kind in ("latents", "text"))


@pytest.mark.parametrize("name", DATA)
def test_every_call_has_an_answer(name, tokenizer, tmp_path):
    dm = _datamodule(name, tmp_path)
    dm.check()
    prompt_vars = dm.bind(
        None if name in CLASS_CONDITIONAL else tokenizer, seed=0, prompt_transform=None
    )
    assert isinstance(prompt_vars, dict)
    subject = dm.subject()
    assert isinstance(subject, dict)
    assert dm.class_dir is None or name == "dreambooth"
    prompts = dm.validation_prompts()
    assert isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)
    assert dm.text_from_cache is (name == "pixart_captions")  # DreamBooth's: once encoded
    if name in CLASS_CONDITIONAL:
        assert isinstance(dm.classes, list) and dm.classes
        assert dm.id2label == dict(enumerate(dm.classes))
        assert dm.class_prompt is None and subject == {} and prompts == []
        if name == "toy_world_classes":
            assert dm.classes == list(SHAPES)
    else:
        assert dm.classes is None and dm.id2label is None
    if name == "dreambooth":
        assert prompt_vars == {"identifier": "sks", "class_noun": "star"}
        assert subject["identifier"] == "sks" and subject["instance_dir"]
        assert dm.class_prompt == "a star" and prompts == []
    else:
        assert subject == {} and dm.class_prompt is None and prompt_vars == {}
    if name in ("captioned", "pixart_captions", "toy_world"):
        assert prompts  # captions, or the config's validation_prompts
    if not dm.CACHES:  # nothing cached: the call needs no model
        keys = dict(model_key={}, vae_factor=8, patch_size=1, text_frozen=True)
        assert dm.prepare_features(object(), **keys) is None
        assert dm.text_from_cache is False


def test_the_base_defaults(tokenizer):
    dm = T2IDataModule()
    dm.check()
    assert dm.bind(tokenizer) == {} and dm.tokenizer is tokenizer
    assert dm.subject() == {} and dm.validation_prompts() == []
    assert dm.class_prompt is None and dm.class_dir is None
    assert dm.id2label is None and dm.classes is None and dm.text_from_cache is False
    assert dm.prepare_features(object(), text_frozen=True) is None


@pytest.mark.parametrize("name", [n for n in DATA if n not in ("dreambooth", "pixart_captions")])
@pytest.mark.parametrize("kind", ["latents", "text"])
def test_caching_a_datamodule_does_not_do_is_refused(name, kind, tmp_path):
    dm = _datamodule(name, tmp_path, f"data.cache.{kind}=true")
    with pytest.raises(
        UserError, match=rf"^data\.cache\.{kind}=true: .*set data\.cache\.{kind}=false$"
    ):
        dm.check()


@pytest.mark.parametrize("name", [n for n in DATA if n != "pixart_captions"])
def test_a_cache_dir_without_an_on_disk_cache_is_refused(name, tmp_path):
    dm = _datamodule(name, tmp_path, f"data.cache.dir={tmp_path / 'cache'}")
    with pytest.raises(UserError, match=r"keeps no cache on disk: set data\.cache\.dir=null$"):
        dm.check()


def test_the_cache_settings_reach_the_datamodule(tmp_path):
    dm = _datamodule("pixart_captions", tmp_path, "data.cache.dir='~/features'")
    assert dm.cache.dir.is_absolute() and dm.cache.dir.name == "features"
    off = _datamodule("dreambooth", tmp_path, "data.cache.latents=false")
    assert (off.cache.latents, off.cache.text) == (False, True)


def test_pixart_caches_latents_and_text_together(tmp_path):
    dm = _datamodule("pixart_captions", tmp_path, "data.cache.text=false")
    with pytest.raises(UserError, match="holds both or neither"):
        dm.check()
    _datamodule("pixart_captions", tmp_path, "data.cache.latents=false", "data.cache.text=false")


@pytest.mark.parametrize(
    "override, match",
    [
        ("+data.cache_dir=/tmp/x", r"^data\.cache_dir is now data\.cache\.dir"),
        ("+data.cache_latents=false", r"^data\.cache_latents is now data\.cache\.latents"),
        ("+data.cache.latent=false", r"^data\.cache\.latent is not a cache setting"),
        ("data.cache.text=yes", r"^data\.cache\.text='yes': use true or false$"),
    ],
)
def test_config_mistakes_are_one_line_errors_from_check(override, match, tmp_path):
    dm = _datamodule("captioned", tmp_path, override)  # instantiate itself never fails on them
    with pytest.raises(UserError, match=match):
        dm.check()
