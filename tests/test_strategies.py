"""Multi-GPU strategy configs compose and build on CPU (running them needs GPUs)."""

from __future__ import annotations

import hydra
import pytest
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

from t2ilab.errors import UserError
from t2ilab.strategies import fsdp_strategy


def test_ddp_config_builds_a_ddp_strategy(make_cfg):
    from lightning.pytorch.strategies import DDPStrategy

    cfg = make_cfg("experiment=dreambooth", "trainer=ddp")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == -1
    assert isinstance(hydra.utils.instantiate(cfg.trainer.strategy), DDPStrategy)


def test_fsdp_config_wraps_the_named_block_classes(make_cfg):
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = make_cfg(
        "experiment=dreambooth",
        "trainer=fsdp",
        "trainer.strategy.activation_checkpointing=[diffusers.models.attention.BasicTransformerBlock]",
        "trainer.strategy.state_dict_type=sharded",
    )
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy._state_dict_type == "sharded"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert set(policy._module_classes) == {BasicTransformerBlock, ResnetBlock2D}


def test_fsdp_rejects_unknown_classes_and_state_dicts():
    with pytest.raises(UserError, match="cannot import module class"):
        fsdp_strategy(["diffusers.models.attention.NoSuchBlock"])
    with pytest.raises(UserError, match="full or sharded"):
        fsdp_strategy(["diffusers.models.resnet.ResnetBlock2D"], state_dict_type="local")


def test_deepspeed_config_composes(make_cfg):
    cfg = make_cfg("experiment=dreambooth", "trainer=deepspeed")
    assert cfg.trainer.strategy.stage == 2


def test_gradient_checkpointing_gives_the_same_gradients():
    import copy

    import torch
    from _support import CONF
    from omegaconf import OmegaConf

    from t2ilab.models.loading import load_sd_components
    from t2ilab.modules.dreambooth import DreamBoothModule

    c = load_sd_components(OmegaConf.load(CONF / "model" / "tiny_sd.yaml"))
    grads = []
    for checkpointing in (False, True):
        cc = copy.deepcopy(c)
        module = DreamBoothModule(**cc.module_kwargs(), gradient_checkpointing=checkpointing)
        module.configure_model()
        assert module.unet.is_gradient_checkpointing is checkpointing
        module.train()
        torch.manual_seed(0)
        batch = {
            "pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1,
            "input_ids": torch.full((2, 77), 49407),
            "num_instance": 2,
        }
        module.diffusion_loss(batch)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.unet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import builtins

    from t2ilab.optim import adamw_8bit

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        adamw_8bit([])


@pytest.mark.parametrize(
    "trainer, model, blocks",
    [
        ("fsdp_flux", "tiny_flux", ("transformer_blocks", "single_transformer_blocks")),
        ("fsdp_sd3", "tiny_sd3", ("transformer_blocks",)),
    ],
)
def test_flow_model_fsdp_wraps_exactly_the_transformers_blocks(make_cfg, trainer, model, blocks):
    """FULL_SHARD, one unit per block: the policy's classes are the classes the model's block
    lists hold (read from a built model, not from the config), checkpointed alike."""
    from _support import CONF
    from omegaconf import OmegaConf

    from t2ilab.models.loading import load_components

    cfg = make_cfg("experiment=lora_dreambooth", f"trainer={trainer}", f"model={model}")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    transformer = load_components(OmegaConf.load(CONF / "model" / f"{model}.yaml")).transformer
    block_classes = {type(b) for name in blocks for b in getattr(transformer, name)}
    assert set(strategy.kwargs["auto_wrap_policy"]._module_classes) == block_classes
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
    assert set(checkpointed) == block_classes
    assert strategy.sharding_strategy.name == "FULL_SHARD"
