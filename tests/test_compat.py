"""A method runs on the backbones whose parts it trains; any other pairing is refused in one
line, before anything loads, naming the methods and models that would run."""

from __future__ import annotations

import pytest
from _support import FAST

import t2ilab.train as train_module
from t2ilab.compat import methods_for, models_for
from t2ilab.errors import UserError


@pytest.fixture
def nothing_loads(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("something loaded before the pairing was checked")

    for name in ("load_components", "load_tokenizer"):
        monkeypatch.setattr(train_module, name, forbidden)


SD_METHODS = "adapter|dreambooth|full|lora|textual_inversion"
SD_MODELS = "sd15|sd21|tiny_sd|toy_sd|toy_sd_init"
PIXART_MODELS = (
    "pixart_alpha_1024|pixart_alpha_256|pixart_alpha_512|tiny_pixart|toy_pixart|toy_pixart_init"
)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["experiment=lora_dreambooth", "model=tiny_pixart"],
            "method=lora trains a Stable Diffusion UNet with CLIP text; model=tiny_pixart is a "
            f"PixArt transformer with T5 text: use method=pixart on this model or "
            f"model={SD_MODELS} for method=lora",
        ),
        (
            ["experiment=adapter_dreambooth", "model=tiny_pixart"],
            "method=adapter trains a Stable Diffusion UNet",
        ),
        (
            ["experiment=dreambooth_sigmoid_zsnr", "model=tiny_pixart"],
            "method=dreambooth trains a Stable Diffusion UNet",
        ),
        (
            ["experiment=dreambooth", "model=tiny_dit"],
            "model=tiny_dit is a class-conditional DiT (no text): use method=dit on this model",
        ),
        (
            ["experiment=dreambooth_pixart", "model=tiny_sd"],
            f"method=pixart trains a PixArt transformer with T5 text; model=tiny_sd is a Stable "
            f"Diffusion UNet with CLIP text: use method={SD_METHODS} on this model or "
            f"model={PIXART_MODELS} for method=pixart",
        ),
    ],
)
def test_a_method_on_a_backbone_it_cannot_train_is_one_line(
    make_cfg, nothing_loads, overrides, line
):
    cfg = make_cfg(*overrides, *FAST)
    with pytest.raises(UserError) as err:
        train_module.train(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert line in message


def test_the_advice_is_read_from_the_config_folders():
    # Written out by hand from conf/method and conf/model: what each family can run.
    assert methods_for("sd") == SD_METHODS.split("|")
    assert methods_for("pixart") == ["pixart"]
    assert methods_for("dit") == ["dit"]
    assert models_for(("pixart",)) == PIXART_MODELS.split("|")
    assert models_for(("dit",)) == ["dit_xl_256", "tiny_dit", "toy_dit_init"]
