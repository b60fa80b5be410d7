"""Every method, model and data that cannot work together is refused in one line, before
anything loads, saying why and what to use instead; the README's matrix is the rules' own."""

from __future__ import annotations

import pytest
from _support import FAST, ROOT

import t2ilab.train as train_module
from t2ilab.compat import matrix, matrix_markdown, methods_for
from t2ilab.errors import UserError


@pytest.fixture
def nothing_loads(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("something loaded before the pairing was checked")

    for name in ("load_components", "load_tokenizer"):
        monkeypatch.setattr(train_module, name, forbidden)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["experiment=textual_inversion", "model=tiny_pixart"],
            "method=textual_inversion on model=tiny_pixart: textual inversion: a PixArt "
            "transformer with T5 text has no stock loader for learned embeddings; use "
            "method=lora or method=adapter",
        ),
        (
            ["experiment=dreambooth", "model=tiny_dit"],
            "method=dreambooth on model=tiny_dit: DreamBooth binds a subject to a text "
            "identifier; a class-conditional DiT (no text) has no text: train it on class labels "
            "with method=full data=class_folder",
        ),
        (
            ["experiment=textual_inversion", "model=tiny_dit"],
            "textual inversion learns a word; a class-conditional DiT (no text) has no text",
        ),
        (
            [
                "experiment=adapter_dreambooth",
                "model=tiny_pixart",
                "method.input_position=Res_in",
                "method.output_position=Res_out",
            ],
            "ResBlock",
        ),
        (
            ["experiment=adapter_dreambooth", "model=tiny_dit", "data=toy_world_classes"],
            "cross-attention",
        ),
        (
            ["experiment=pixart_stage1", "model=tiny_sd"],
            "the data gives class labels; a Stable Diffusion UNet with CLIP text is conditioned "
            "on prompts: use data=dreambooth or data=captioned",
        ),
        (
            ["method=full", "model=tiny_dit", "data=dreambooth"],
            "the data gives prompts; a class-conditional DiT (no text) takes class labels",
        ),
        (
            ["experiment=lora_dreambooth", "model=tiny_pixart", "method.train_text_encoder=true"],
            "LoRA on the text encoder: a PixArt transformer with T5 text has no stock loader",
        ),
    ],
)
def test_a_pairing_that_cannot_work_is_one_line(make_cfg, nothing_loads, overrides, line):
    cfg = make_cfg(*overrides, *FAST)
    with pytest.raises(UserError) as err:
        train_module.train(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert line in message


def test_methods_for_a_family_follow_its_parts():
    assert methods_for("sd") == [
        "adapter",
        "dit",
        "dreambooth",
        "full",
        "lora",
        "pixart",
        "textual_inversion",
    ]
    # No stock loader for learned embeddings on PixArt; DiT has no text and no cross-attention.
    assert "textual_inversion" not in methods_for("pixart")
    assert "lora" in methods_for("pixart") and "adapter" in methods_for("pixart")
    assert methods_for("dit") == ["dit", "full", "lora", "pixart"]


def test_the_matrix_refuses_exactly_the_cells_that_lack_parts():
    refused = {cell for cell, reason in matrix().items() if reason}
    assert refused == {
        ("textual_inversion", "tiny_pixart"),
        ("textual_inversion", "tiny_pixart_sigma"),
        ("textual_inversion", "tiny_dit"),
        ("adapter", "tiny_dit"),
        ("textual_inversion", "tiny_sd3"),  # StableDiffusion3Pipeline has no TI loader
    }


def test_the_readme_shows_the_generated_matrix():
    readme = (ROOT / "README.md").read_text()
    assert matrix_markdown() in readme, "run: python -m t2ilab.compat --markdown, paste in README"
