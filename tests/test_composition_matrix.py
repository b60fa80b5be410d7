"""The composition matrix: every method on every tiny backbone either trains two steps, exports
its artefact, reloads through the stock loader (t2ilab.models.export.load_export calls diffusers'
or peft's) and samples what the trained module samples, or is refused in its one line before
anything loads. The cells and their refusals come from t2ilab.compat, as the README's table."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import t2ilab.train as train_module
from t2ilab.compat import MATRIX_METHODS, MATRIX_MODELS, matrix, matrix_overrides
from t2ilab.errors import UserError
from t2ilab.models.export import load_export
from t2ilab.models.loading import load_components
from t2ilab.models.pipelines import make_sampler, pipeline_call_kwargs

CELLS = [(method, model) for model in MATRIX_MODELS for method in MATRIX_METHODS]
QUICK = [
    "trainer.max_steps=2",
    "method.lr=1e-3",
    "method.num_class_images=1",
    "method.class_image_batch_size=1",
    "sampling.num_inference_steps=2",
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.at_end=false",
    "callbacks.model_checkpoint.every_n_train_steps=null",
    "logger=csv",
    "eval=none",
]


def sample(pipe, prompt, seed=0):
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_inference_steps=2, generator=generator, output_type="np")
    if isinstance(prompt, int):
        return pipe(class_labels=[prompt], guidance_scale=1.0, **common).images[0]
    return pipe(
        prompt, height=64, width=64, guidance_scale=1.0, **common, **pipeline_call_kwargs(pipe)
    ).images[0]


@pytest.mark.parametrize(("method", "model"), CELLS, ids=[f"{m}-{b}" for m, b in CELLS])
def test_cell_runs_or_is_refused_in_one_line(method, model, make_cfg, monkeypatch):
    cfg = make_cfg(*matrix_overrides(method, model), *QUICK)
    reason = matrix()[method, model]
    if reason is not None:
        monkeypatch.setattr(train_module, "load_components", None)  # nothing may load
        with pytest.raises(UserError, match=re.escape(reason)) as err:
            train_module.train(cfg)
        assert "\n" not in str(err.value)
        return

    trained = {}
    export = train_module.export_run

    def keep_module(cfg, module, out_dir, metadata):
        trained["module"] = module
        export(cfg, module, out_dir, metadata)

    monkeypatch.setattr(train_module, "export_run", keep_module)
    result = train_module.train(cfg)
    assert result["steps"] == 2
    module = trained["module"].eval()

    reloaded = load_export(train_module.export_dir(cfg))
    if module.backbone.has_text:
        prompt = "a {identifier} {class_noun}".format(**module.prompt_vars)
    else:
        prompt = 1
    sampler = make_sampler(None, module.objective.inference_config())
    with torch.no_grad():
        expected = sample(module.pipeline(sampler), prompt)
        got = sample(reloaded, prompt)
        base = sample(load_components(cfg.model).pipeline(sampler), prompt)
    assert got.shape == expected.shape
    # The reloaded export renders what the trained weights render (LoRA merged by peft on
    # PixArt/DiT, or scaled by diffusers' loader, differs only in rounding)...
    np.testing.assert_allclose(got, expected, atol=2e-3)
    # ...and what it carries is the training: two steps moved the image further from the base
    # model's than the export's rounding did (an empty export would render the base exactly).
    assert np.abs(got - base).max() > 10 * np.abs(got - expected).max()
