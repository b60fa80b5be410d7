"""The one diffusion training step every method shares.

Encode (or take) latents, sample noise and timesteps, noise the latents, build the target by
prediction type, predict, and reduce the per-sample loss with optional Min-SNR weights and the
prior-preservation split. The backbone (t2ilab.models.backbone: the `model` axis) builds the
condition and runs the denoiser; a method's subclass says what trains and what it exports.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import hydra
import lightning as L
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from omegaconf import OmegaConf
from torch import nn

from t2ilab.checkpoints import check_loaded_weights, stamp
from t2ilab.models.backbone import Backbone
from t2ilab.models.families import FAMILIES, Family
from t2ilab.modules.losses import per_sample_mse, prior_preservation_loss
from t2ilab.modules.step_random import GroupedDraws, StepRandom, grouped
from t2ilab.noise import NoiseConfig, sample_noise
from t2ilab.objectives import DDPMObjective, build_objective
from t2ilab.optim import fused_where_possible

log = logging.getLogger(__name__)


def constructor_parameters(cls: type) -> set[str]:
    """The keyword names the class's constructors take, along its t2ilab base classes (each
    passes the rest on with **kwargs)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or not klass.__module__.startswith("t2ilab."):
            continue
        names |= {
            name
            for name, p in inspect.signature(init).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"
        }
    return names


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); torch's private probes,
    absent from some builds, count as no."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


class DiffusionModule(L.LightningModule):
    """Base LightningModule of every method, over any backbone. The backbone's parts are
    registered under their pipeline names (`unet` or `transformer`, `vae`, `text_encoder`, ...).

    `optimizer` and `lr_scheduler` are Hydra `_partial_` callables: optimizer(params=...),
    lr_scheduler(optimizer=...).
    """

    def __init__(
        self,
        backbone: Backbone,
        noise: NoiseConfig | dict | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        prior_loss_weight: float = 1.0,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        vae_bf16_encode: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.compile_backbone = compile
        self.channels_last = channels_last
        self.vae_bf16_encode = vae_bf16_encode
        noise = noise if isinstance(noise, NoiseConfig) else NoiseConfig.from_dict(noise)
        family = FAMILIES[backbone.family]
        self.noise = noise.for_objective(family.objective, backbone.family)
        scheduler_config = backbone.scheduler_config
        self.objective = build_objective(scheduler_config, self.noise, backbone.patch_size)
        self.base_scheduler_config = dict(scheduler_config)
        for name, part in backbone.modules().items():
            setattr(self, name, part.requires_grad_(False))  # a method unfreezes what it trains
        backbone.bind(self)
        self.backbone = backbone
        self.vae.eval()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.prior_loss_weight = prior_loss_weight
        # Checkpoints hold only trainable weights (see on_save_checkpoint), so loading is partial.
        self.strict_loading = False
        self.prompt_vars: dict[str, str] = {}  # e.g. identifier, class_noun: used by callbacks
        self.prompt_transform: Callable[[str], str] | None = None
        self.seed = seed  # keys the step's noise and timesteps (see step_random)
        # Set when every prompt state comes from a cache: the text encoder then waits on the CPU
        # during training, and comes back to the device only for sampling/eval/export.
        self.offload_text_encoder = False
        self.offload_vae = False  # likewise the VAE, when every latent comes from a cache
        self.ema_callback = None  # set by t2ilab.callbacks.ema.EMACallback
        self._calls_without_trainer = 0
        # What trained this module (settings, resumes): stamped into every checkpoint.
        self.run_record: dict[str, Any] = {}

    artefact = "pipeline"  # what save_artefact writes (recorded in the export's t2ilab.json)

    @classmethod
    def from_config(cls, method_cfg, backbone: Backbone, **extra) -> DiffusionModule:
        """The method's module from its config: `method.module` (the class, optimizer and LR
        schedule) plus every method key the constructor names, handed over by name, so each
        key is written once in conf/method."""
        names = constructor_parameters(hydra.utils.get_class(method_cfg.module._target_))
        given = set(method_cfg.module) | set(extra) | {"backbone"}
        kwargs = {
            key: OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            for key, value in method_cfg.items()
            if key in names and key not in given
        }
        return hydra.utils.instantiate(method_cfg.module, backbone=backbone, **kwargs, **extra)

    @classmethod
    def check_method(cls, method_cfg) -> None:
        """Cheap checks of the method's config, before any weights load."""

    @classmethod
    def refusal(cls, family: Family, method_cfg) -> str | None:
        """Why this method cannot run on a backbone of `family` (one line), or None when it can.
        Read from the family's description alone, before any weights load (t2ilab.compat)."""
        if method_cfg.get("train_text_encoder") and not family.text:
            return f"method.train_text_encoder=true needs a text encoder; {family.description} has none"
        return None

    @classmethod
    def text_encoder_frozen(cls, method_cfg) -> bool:
        """Whether prompt features stay fixed during training (then they can be cached)."""
        return not method_cfg.get("train_text_encoder", False)

    @classmethod
    def prepare_tokenizer(cls, tokenizer, method_cfg) -> Callable[[str], str] | None:
        """Before any prompt is tokenized: add tokens the method trains (textual inversion) and
        return a prompt rewrite to use them, or None."""
        return None

    # --- what the backbone provides ---------------------------------------------------------

    @property
    def denoiser(self) -> nn.Module:
        """The UNet or transformer: what parameter shares are reported against."""
        return self.backbone.denoiser

    @property
    def tokenizer(self):
        """The (first) tokenizer; None for a class-conditional backbone."""
        return getattr(self.backbone, "tokenizer", None)

    def text_trains(self) -> bool:
        return any(p.requires_grad for e in self.backbone.text_encoders for p in e.parameters())

    def encode_condition(self, batch: dict[str, Any]) -> Any:
        if "condition" in batch:  # the data's cache of the frozen text encoders' encoding
            return batch["condition"]
        # Gradients reach the text encoders only when some of them trains (fine-tuning, LoRA on
        # the text encoder, textual inversion's embedding rows).
        return self.backbone.encode_condition(batch, text_grad=self.text_trains())

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, condition: Any
    ) -> torch.Tensor:
        return self.backbone.predict(noisy_latents, timesteps, condition)

    def pipeline(self, scheduler):
        """A diffusers pipeline over the module's current weights, sampling with `scheduler`."""
        return self.backbone.pipeline(scheduler)

    def save_artefact(self, folder, scheduler) -> None:
        """The trained model in its standard format (by default the whole pipeline folder)."""
        self.backbone.save_pipeline(folder, scheduler)

    # --- the shared step ---------------------------------------------------------------------

    @torch.no_grad()
    def vae_posterior(self, pixel_values: torch.Tensor) -> DiagonalGaussianDistribution:
        """The frozen VAE's posterior of the images, its moments in fp32. With
        `vae_bf16_encode` the encoder runs under bf16 autocast even in an fp32 run: on CPUs with
        bf16 units (AVX512-BF16, AMX) the toy VAE encodes 2.6x faster, its latents within 0.4%
        (experiments/toy_world/README.md); the moments are cast back so the noise drawn around
        them is the fp32 run's."""
        vae = self.vae
        pixels = pixel_values.to(vae.dtype)
        if self.vae_bf16_encode:
            with torch.autocast(pixels.device.type, dtype=torch.bfloat16):
                moments = vae.encode(pixels).latent_dist.parameters
            return DiagonalGaussianDistribution(moments.float())
        return vae.encode(pixels).latent_dist

    @torch.no_grad()
    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        latents = self.vae_posterior(pixel_values).sample()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def step_random(self, device: torch.device) -> StepRandom:
        """This step's random draws (see t2ilab.modules.step_random). Under a trainer the key is
        the step and the batch within it, so resumed and multi-rank runs draw the same values;
        outside one (tests, benchmarks) every call is a new key."""
        trainer = self._trainer
        if trainer is None:
            self._calls_without_trainer += 1
            return StepRandom(self.seed, (self._calls_without_trainer,), device=device)
        loop = trainer.fit_loop
        key = (trainer.global_step, loop.epoch_loop.batch_idx, trainer.current_epoch)
        return StepRandom(self.seed, key, trainer.global_rank, trainer.world_size, device)

    def batch_latents(self, batch: dict[str, Any], rand: StepRandom) -> torch.Tensor:
        """Latents sampled from the VAE posterior, computed here or read from a feature cache's
        stored (mean, std); the same arithmetic as diffusers' latent_dist.sample()."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            posterior = self.vae_posterior(batch["pixel_values"])
            mean, std = posterior.mean, posterior.std
        num_instance = int(batch.get("num_instance", mean.shape[0]))
        eps = grouped(rand.randn, "posterior", mean.shape, num_instance, dtype=mean.dtype)
        latents = mean + std * eps
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def diffusion_loss(
        self, batch: dict[str, Any], rand: StepRandom | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss and its parts; `rand` fixes the draws (default: this step's)."""
        rand = rand or self.step_random(self.device)
        latents = self.batch_latents(batch, rand).float()
        num_instance = int(batch.get("num_instance", latents.shape[0]))
        draws = GroupedDraws(rand, num_instance)
        noise = sample_noise(draws.randn, latents.shape, self.noise.offset_noise)
        objective = self.objective
        timesteps = objective.timesteps(draws, latents)
        noisy_latents = objective.noised(latents, noise, timesteps)
        target = objective.target(latents, noise, timesteps)

        prediction = self.predict(noisy_latents, timesteps, self.encode_condition(batch))

        per_sample = per_sample_mse(prediction, target)
        weights = objective.loss_weights(timesteps)
        return prior_preservation_loss(per_sample, num_instance, self.prior_loss_weight, weights)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, parts = self.diffusion_loss(batch)
        batch_size = int(batch.get("num_instance", 1))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if self._loggers_write_this_step():
            for name, value in parts.items():
                self.log(f"train/{name}", value, batch_size=batch_size)
            if self.trainer.optimizers:
                lr = self.trainer.optimizers[0].param_groups[0]["lr"]
                self.log("train/lr", lr, batch_size=batch_size)
        return loss

    def _loggers_write_this_step(self) -> bool:
        """Whether the loggers write this step's metrics (every trainer.log_every_n_steps).
        Each self.log costs Lightning ~5 ms of Python (a pass over its result collection), as
        much as a small model's step on a GPU: the loss is logged every step (progress bar,
        callbacks), the loss parts and the LR only when they will be written."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return connector is None or bool(connector.should_update_logs)

    # --- what sampling, evaluation and export see ----------------------------------------------

    def trained_parts(self) -> set[str]:
        """The backbone parts in train mode while training: those with a trained parameter."""
        return {
            name
            for name, part in self.backbone.modules().items()
            if any(p.requires_grad for p in part.parameters())
        }

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts (the VAE, a frozen text encoder or denoiser) stay in eval mode: no dropout.
        if mode:
            trained = self.trained_parts()
            for name in self.backbone.modules():
                if name not in trained:
                    getattr(self, name).eval()
        return self

    def on_train_start(self) -> None:
        # Lightning keeps each submodule's mode at fit start, and components load in eval mode;
        # train() puts what is trained in train mode (dropout, the DiT's label dropout that
        # trains its null class for guidance) and keeps the frozen parts in eval mode.
        self.train()
        offloaded = self.offloaded_parts() if self.device.type != "cpu" else []
        for part in offloaded:
            part.to("cpu")  # its features come from the cache: free its device memory
        if offloaded:
            torch.cuda.empty_cache()

    def offloaded_parts(self) -> list[nn.Module]:
        """Frozen encoders whose every output training reads from a feature cache: they wait on
        the CPU while training runs (offload_text_encoder, offload_vae)."""
        parts = list(self.backbone.text_encoders) if self.offload_text_encoder else []
        if self.offload_vae and not any(p.requires_grad for p in self.vae.parameters()):
            parts.append(self.vae)
        return parts

    @contextmanager
    def for_inference(self) -> Iterator[None]:
        """The module as sampling, evaluation and export should see it: the EMA weights when
        EMA is on, and offloaded encoders back on the module's device."""
        with ExitStack() as stack:
            if self.ema_callback is not None and self.ema_callback.ema is not None:
                stack.enter_context(self.ema_callback.swapped_in(self))
            for part in self.offloaded_parts():
                on_cpu = next(part.parameters()).device.type == "cpu"
                if on_cpu and self.device.type != "cpu":
                    part.to(self.device)
                    stack.callback(part.to, "cpu")
            yield

    # --- optimisation and checkpoints ---------------------------------------------------------

    def configure_model(self) -> None:
        """Memory and speed options on the denoiser, applied once before training starts."""
        if self.gradient_checkpointing and not getattr(self, "_checkpointing_on", False):
            self.denoiser.enable_gradient_checkpointing()
            self._checkpointing_on = True
        if self.channels_last:
            # 4-D weights (a UNet's convolutions) in NHWC: tensor cores' native layout, so
            # cuDNN skips the transposes around each convolution; other weights are unchanged.
            self.denoiser.to(memory_format=torch.channels_last)
        if self.vae_bf16_encode and self.device.type == "cpu" and not cpu_has_bf16_units():
            log.warning(
                "method.vae_bf16_encode=true on a CPU without bf16 units (AVX512-BF16 or AMX): "
                "encoding will be slower than in fp32; set method.vae_bf16_encode=false"
            )
        if self.compile_backbone and not getattr(self, "_compiled", False):
            self.denoiser.compile()  # in place: parameter names (and checkpoints) are unchanged
            self._compiled = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trained_parameter_count(self) -> int:
        """Parameters the method actually changes (reported as the method's size)."""
        return sum(p.numel() for p in self.trainable_parameters())

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters")
        if self.optimizer_factory is None:
            raise RuntimeError("no optimizer configured (set method.optimizer)")
        trainer = self._trainer
        factory = fused_where_possible(
            self.optimizer_factory, trainer.precision_plugin if trainer is not None else None
        )
        optimizer = factory(params=params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer in case a
        # gradient scaler left the gradients scaled; bf16-mixed has no scaler, so they are the
        # true gradients and the plain plugin's clipping is exact (fused_where_possible).
        plugin = self.trainer.precision_plugin
        if (
            gradient_clip_val
            and getattr(optimizer, "_step_supports_amp_scaling", False)
            and isinstance(plugin, MixedPrecision)
            and plugin.scaler is None
        ):
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @property
    def noise_scheduler(self):
        """The DDPM training scheduler (betas, alphas_cumprod); DDPM objectives only."""
        if not isinstance(self.objective, DDPMObjective):
            raise AttributeError(f"a {self.objective.name} objective has no DDPM scheduler")
        return self.objective.scheduler

    def noise_factors(self) -> dict[str, Any]:
        """The objective as it resolved over the model's own scheduler config: the values a
        `noise.*: null` ("the model's own") stands for, for results.json's factors."""
        return self.objective.factors()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Loading is partial (strict_loading=False): a checkpoint of another model or method
        # would load nothing and train on silently; refuse it instead.
        trainer = self._trainer
        if trainer is not None and "FSDP" in type(trainer.strategy).__name__:
            return  # sharded parameter names; the pre-check (inspect_checkpoint) still ran
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        path = str(trainer.ckpt_path) if trainer is not None else "the checkpoint"
        check_loaded_weights(checkpoint, trainable, path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_record:
            stamp(checkpoint, self.run_record)
        # Frozen backbones (VAE, frozen text encoder) are reloaded from the model config; keeping
        # them out of every checkpoint saves gigabytes per save on SD-sized models.
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        trainable |= {name for name, _ in self.named_buffers()}
        checkpoint["state_dict"] = {
            k: v
            for k, v in checkpoint["state_dict"].items()
            if k in trainable or self._keep_in_checkpoint(k)
        }

    def _keep_in_checkpoint(self, key: str) -> bool:
        return False
