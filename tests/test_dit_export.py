"""DiT exports (PixArt's stage 1) keep their class names where stock diffusers reads them."""

from __future__ import annotations

import json

import pytest
from _support import ROOT
from diffusers import DDIMScheduler, DiTPipeline
from omegaconf import OmegaConf

from t2ilab.models.export import export_pipeline, load_export
from t2ilab.models.pixart_dit import load_dit_components
from t2ilab.modules.full import FullModule as DiTModule

LABELS = {0: "circle", 1: "square", 2: "star", 3: "triangle"}


@pytest.fixture(scope="module")
def tiny_dit_cfg():
    return OmegaConf.load(ROOT / "conf" / "model" / "tiny_dit.yaml")


@pytest.fixture(scope="module")
def dit_export(tiny_dit_cfg, tmp_path_factory):
    c = load_dit_components(tiny_dit_cfg)
    module = DiTModule(**c.module_kwargs())
    module.backbone.id2label = dict(LABELS)
    return export_pipeline(module, tmp_path_factory.mktemp("dit") / "export")


def test_stock_dit_pipeline_reads_the_exports_labels(dit_export):
    pipe = DiTPipeline.from_pretrained(dit_export)
    assert pipe.get_label_ids(["star", "circle"]) == [2, 0]
    index = json.loads((dit_export / "model_index.json").read_text())
    assert index["id2label"] == {str(k): v for k, v in LABELS.items()}  # as DiT-XL-2-256 ships


def test_labels_of_older_exports_are_still_read(tiny_dit_cfg, tmp_path):
    """Before, the names sat only in id2label.json beside a model_index.json without them."""
    c = load_dit_components(tiny_dit_cfg)
    old = tmp_path / "old_export"
    DiTPipeline(transformer=c.transformer, vae=c.vae, scheduler=DDIMScheduler()).save_pretrained(
        old
    )
    (old / "id2label.json").write_text(json.dumps(LABELS))
    assert DiTPipeline.from_pretrained(old).labels == {}  # what stock diffusers sees
    assert load_export(old).get_label_ids(["triangle"]) == [3]
    again = load_dit_components(OmegaConf.merge(tiny_dit_cfg, {"pretrained": str(old)}))
    assert again.id2label == LABELS  # a stage that continues from the old export
