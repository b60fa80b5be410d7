"""The floor of the side-by-side benchmark: t2ilab's training step in a bare PyTorch loop.

    python floor.py experiment=dreambooth model.pretrained=/path/to/model ... trainer.max_steps=100

The same Hydra overrides as `python train.py` build the same module (method, backbone, noise,
optimizer and LR schedule), the same data and the same feature caches, through the functions
train.py uses. Then, instead of `Trainer.fit`, a plain loop: batch -> `module.diffusion_loss`
-> backward -> clip the gradient norm (trainer.gradient_clip_val) -> optimizer and LR-scheduler
step -> `zero_grad(set_to_none=True)`. No Lightning loop, logger, progress bar, callbacks,
checkpoint or export. t2ilab's step time over this loop's is the framework's overhead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    os.environ.setdefault("T2ILAB_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)


def build(cfg):
    """Module and loader exactly as train.py builds them (the optimizer comes after the move to
    the device, see `optimizers`)."""
    import hydra
    import lightning as L
    from hydra.core.hydra_config import HydraConfig

    from t2ilab.build import build_module, prepare_data
    from t2ilab.models.loading import load_components, load_tokenizer

    HydraConfig.instance().set_config(cfg)  # ${hydra:...} interpolations resolve as in a run
    L.seed_everything(cfg.seed, workers=True)
    module_class = hydra.utils.get_class(cfg.method.module._target_)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.check()
    tokenizer = load_tokenizer(cfg.model)
    prompt_transform = module_class.prepare_tokenizer(tokenizer, cfg.method)
    prompt_vars = datamodule.bind(tokenizer, seed=int(cfg.seed), prompt_transform=prompt_transform)
    backbone = load_components(cfg.model, tokenizer)
    prepare_data(cfg, datamodule, backbone, module_class)
    module = build_module(cfg, backbone, datamodule, prompt_vars, prompt_transform)
    datamodule.setup("fit")
    return module, datamodule.train_dataloader()


def optimizers(module):
    """The module's optimizer and LR scheduler, from its configure_optimizers."""
    configured = module.configure_optimizers()
    if isinstance(configured, dict):
        return configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    return configured, None


def device_and_autocast(cfg) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype trainer.accelerator and trainer.precision ask for."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in ("32-true", "32", "bf16-mixed"):
        raise SystemExit(f"floor.py runs fp32 or bf16-mixed, not trainer.precision={precision}")
    gpu = cfg.trainer.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    return device, torch.bfloat16 if precision == "bf16-mixed" else None


def main(overrides: list[str]) -> None:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    cfg = compose(overrides)
    device, autocast_dtype = device_and_autocast(cfg)
    module, loader = build(cfg)
    module.to(device)
    module.configure_model()
    module.on_train_start()  # train mode for what trains; cached encoders wait on the CPU
    optimizer, scheduler = optimizers(module)  # after the move, as Lightning creates them
    max_steps = int(cfg.trainer.max_steps)
    clip = cfg.trainer.get("gradient_clip_val")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step = 0
    while step < max_steps:
        for batch in loader:
            batch = move_data_to_device(batch, device)
            with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                loss, _ = module.diffusion_loss(batch)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step >= max_steps:
                break
    print(f"floor: {step} steps, last loss {loss.item():.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
