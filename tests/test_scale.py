"""conf/scale/ applies after the experiment: a run names what it changed, in one line."""

from __future__ import annotations

import logging

from t2ilab.scale import scale_changes, scale_line
from t2ilab.train import log_scale_changes

# experiment=dreambooth_sigmoid on its model=toy_sd: what conf/scale/toy_sd.yaml replaces. Its
# sampling.num_inference_steps equals the experiment's: not listed.
TOY_SD = {
    "method.lr": (5e-06, 6e-04),
    "method.module.lr_scheduler.name": ("constant", "cosine"),
    "method.num_class_images": (200, 100),
    "method.class_image_batch_size": (4, 25),
    "data.batch_size": (1, 4),
    "trainer.max_steps": (800, 500),
    "sampling.guidance_scale": (7.5, 4.0),
    "callbacks.samples.images_per_prompt": (2, 4),
    "callbacks.model_checkpoint.every_n_train_steps": (200, 250),
    "callbacks.samples.every_n_steps": (200, 250),
}


def test_scale_names_exactly_what_it_changed(make_cfg, caplog):
    cfg = make_cfg("experiment=dreambooth_sigmoid")
    changes = scale_changes(cfg)
    prompts = changes.pop("callbacks.samples.prompts")
    assert changes == TOY_SD
    assert prompts[1] == list(cfg.callbacks.samples.prompts) != prompts[0]
    with caplog.at_level(logging.INFO, logger="t2ilab.train"):
        log_scale_changes(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "t2ilab.train"]
    assert len(lines) == 1
    assert lines[0].startswith("scale/toy_sd (applied with model=toy_sd, after the experiment)")
    assert (
        "method.lr 5e-06 -> 0.0006, method.module.lr_scheduler.name constant -> cosine," in lines[0]
    )
    assert "callbacks.samples.prompts [4 items] -> [4 items]" in lines[0]
    assert "num_inference_steps" not in lines[0]


def test_command_line_keys_are_not_listed(make_cfg):
    cfg = make_cfg("experiment=dreambooth_sigmoid", "method.lr=3e-5", "sampling.guidance_scale=4")
    changes = scale_changes(cfg)
    assert "method.lr" not in changes and "sampling.guidance_scale" not in changes
    assert changes["method.num_class_images"] == (200, 100)
    assert "method.lr" not in scale_line(cfg)


def test_no_line_without_a_scale_file(make_cfg, caplog):
    for overrides in (["experiment=dreambooth_sigmoid", "model=sd15"], ["~scale"]):
        cfg = make_cfg(*overrides)
        assert scale_line(cfg) is None
        with caplog.at_level(logging.INFO, logger="t2ilab.train"):
            log_scale_changes(cfg)
    assert not [r for r in caplog.records if r.name == "t2ilab.train"]


def test_a_chosen_scale_is_compared_with_none(make_cfg):
    # scale=tiny_sd on the toy model: compared with the config without any scale file.
    changes = scale_changes(make_cfg("experiment=dreambooth_sigmoid", "scale=tiny_sd"))
    assert changes["trainer.max_steps"] == (800, 40)
    assert changes["eval.evaluators"] == ("pretrained", "tiny_random")
