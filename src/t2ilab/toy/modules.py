"""One LightningModule per toy model: what it trains on, its loss, and its exported folder.

Each module knows three things the recipe runner (`t2ilab.toy.pretrain`) asks for:
`train_dataset(size, seed)` (+ `collate`), `export(folder)` (the standard artefact: a diffusers
or transformers folder), and `evaluate(folder, seed)` (quality numbers and a sample grid, read
from the exported folder through the loaders users call).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, default_collate

from t2ilab.metrics.embedders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_embedding,
)
from t2ilab.models.backbone import forget_load_paths
from t2ilab.toy import quality
from t2ilab.toy.models import build_clip, build_dino, build_vae
from t2ilab.toy.streams import (
    CaptionedRenders,
    ObjectViews,
    Renders,
    collate_captioned,
    collate_views,
)
from t2ilab.toy.tokenizer import build_toy_tokenizer, save_toy_tokenizer


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float):
    """Linear warm-up to the base lr, then a cosine down to `min_ratio` of it at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against targets spread evenly over each row's positives (several images
    can fit one caption, several objects can look the same)."""
    targets = positives.float() / positives.float().sum(1, keepdim=True)
    return -(targets * logits.log_softmax(1)).sum(1).mean()


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """[-1, 1] renders -> what a transformers image processor gives ((x/255 - mean) / std)."""
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


class ToyPretrainModule(L.LightningModule):
    """AdamW with warm-up + cosine decay, stepped every batch; subclasses add the model."""

    collate = staticmethod(default_collate)

    def __init__(
        self,
        lr: float,
        max_steps: int,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        min_lr_ratio: float = 0.1,
        resolution: int = 64,
    ):
        super().__init__()
        self.lr, self.max_steps, self.warmup_steps = lr, max_steps, warmup_steps
        self.weight_decay, self.min_lr_ratio, self.resolution = (
            weight_decay,
            min_lr_ratio,
            resolution,
        )

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            [p for p in self.parameters() if p.requires_grad],
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=(0.9, 0.99),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.warmup_steps, self.max_steps, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def log_train(self, loss: torch.Tensor, **extra: torch.Tensor) -> None:
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        for name, value in extra.items():
            self.log(f"train/{name}", value, prog_bar=True)

    # what the recipe runner calls
    def train_dataset(self, size: int, seed: int) -> Dataset:
        raise NotImplementedError

    def export(self, folder: Path) -> None:
        raise NotImplementedError

    @staticmethod
    def evaluate(folder: Path, seed: int) -> tuple[dict[str, float], Image.Image]:
        raise NotImplementedError

    @property
    def model(self) -> torch.nn.Module:
        raise NotImplementedError


class VaeTraining(ToyPretrainModule):
    """What the toy VAE's trainings share: L1 + MSE + an L1 on image gradients (crisp edges, no
    perceptual net) + a KL weight (its sum over latent elements per pixel, as in LDM's
    autoencoder loss), on renders with extras mixed in, and the evaluation. The subclass
    builds or loads `self.vae`."""

    vae: torch.nn.Module

    def __init__(
        self,
        kl_weight: float,
        l1_weight: float,
        mse_weight: float,
        edge_weight: float,
        extras_prob: float,
        scale_images: int,
        **optim,
    ):
        super().__init__(**optim)
        self.kl_weight, self.l1_weight, self.mse_weight = kl_weight, l1_weight, mse_weight
        self.edge_weight, self.extras_prob = edge_weight, extras_prob
        self.scale_images = scale_images  # renders that measure the latent std at export

    @property
    def model(self):
        return self.vae

    def train_dataset(self, size: int, seed: int) -> Dataset:
        return Renders(size, seed, self.resolution, self.extras_prob)

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        posterior = self.vae.encode(images).latent_dist
        output = self.vae.decode(posterior.sample()).sample
        error = output - images
        l1, mse = error.abs().mean(), (error**2).mean()
        edges = (error.diff(dim=-1).abs().mean() + error.diff(dim=-2).abs().mean()) / 2
        kl = posterior.kl().mean() / images[0].numel()
        loss = (
            self.l1_weight * l1
            + self.mse_weight * mse
            + self.edge_weight * edges
            + self.kl_weight * kl
        )
        self.log_train(loss, l1=l1, kl=kl)
        return loss

    @torch.no_grad()
    def latent_std(self, seed: int) -> float:
        """Std of posterior samples on renders the VAE did not train on (`seed`)."""
        renders = Renders(self.scale_images, seed, self.resolution)
        images = torch.stack([renders[i] for i in range(len(renders))])
        latents = [
            self.vae.encode(chunk).latent_dist.sample(torch.Generator().manual_seed(seed))
            for chunk in images.split(64)
        ]
        return float(torch.cat(latents).std())

    @staticmethod
    def evaluate(folder: Path, seed: int) -> tuple[dict[str, float], Image.Image]:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder)
        return quality.vae_quality(vae, seed), quality.vae_grid(vae, seed)


class VaePretrain(VaeTraining):
    """An AutoencoderKL from scratch, with a small KL.

    The posterior's log-variance starts at `logvar_init` instead of 0: with the KL this small
    the latents' noise must shrink anyway, and Adam moves a bias only ~lr per step, so from 0
    the decoder would spend hundreds of steps learning through unit-variance noise."""

    def __init__(
        self,
        vae: dict,
        kl_weight: float = 1e-5,
        l1_weight: float = 1.0,
        mse_weight: float = 1.0,
        edge_weight: float = 0.5,
        extras_prob: float = 0.25,
        scale_images: int = 512,
        logvar_init: float = -6.0,
        **optim,
    ):
        super().__init__(
            kl_weight, l1_weight, mse_weight, edge_weight, extras_prob, scale_images, **optim
        )
        self.save_hyperparameters()
        self.vae = build_vae(**vae, resolution=self.resolution)
        with torch.no_grad():  # quant_conv's output is (mean, logvar) along channels
            self.vae.quant_conv.bias[self.vae.config.latent_channels :] = logvar_init

    def export(self, folder: Path) -> None:
        """The diffusers folder, with `scaling_factor` = 1 / latent std (as SD's 0.18215), so
        diffusion models see unit-variance latents."""
        self.vae.eval()
        scaling = 1.0 / self.latent_std(seed=quality.EVAL_SEED + 1)
        self.vae.register_to_config(scaling_factor=round(scaling, 5))
        self.vae.save_pretrained(folder, safe_serialization=True)


class VaeDecoderFinetune(VaeTraining):
    """More training for a shipped VAE's decoder alone (`init_from`). The encoder, and with it
    the latent space every toy denoiser was trained in and the scaling factor, stay exactly as
    they are: the denoisers draw sharper images without retraining. The base folder's
    training.json travels along as base_training.json (what the weights started from)."""

    def __init__(
        self,
        init_from: str,
        l1_weight: float = 1.0,
        mse_weight: float = 1.0,
        edge_weight: float = 0.5,
        extras_prob: float = 0.5,
        **optim,
    ):
        from diffusers import AutoencoderKL

        # No KL: the encoder, and so the posterior, does not train.
        super().__init__(0.0, l1_weight, mse_weight, edge_weight, extras_prob, 512, **optim)
        self.save_hyperparameters()
        base = Path(init_from).expanduser()
        self.vae = AutoencoderKL.from_pretrained(base).train()  # loaded in eval mode
        self.vae.requires_grad_(False)
        self.vae.decoder.requires_grad_(True)
        self.vae.post_quant_conv.requires_grad_(True)
        # Read now: the output folder may be the base folder, replaced at export. The records
        # go newest first, one list however many fine-tunes the base already had.
        self.base_training = []
        if (base / "training.json").is_file():
            self.base_training.append(json.loads((base / "training.json").read_text()))
        if (base / "base_training.json").is_file():
            self.base_training += json.loads((base / "base_training.json").read_text())

    def export(self, folder: Path) -> None:
        """The diffusers folder with the base's scaling factor (same encoder, same latents)."""
        self.vae.eval().save_pretrained(folder, safe_serialization=True)
        forget_load_paths(folder)  # where the base was loaded from, on this machine
        if self.base_training:
            (folder / "base_training.json").write_text(json.dumps(self.base_training, indent=2))


class ClipPretrain(ToyPretrainModule):
    """CLIPModel, contrastive on (render, caption) pairs with multi-positive targets (a short
    caption is true of every image it describes). The tokenizer is the toy one
    (`t2ilab.toy.tokenizer`), padded to its full context as the diffusion pipeline does."""

    def __init__(
        self,
        text: dict,
        vision: dict,
        projection_dim: int,
        patch_size: int = 8,
        dense_prob: float = 0.5,
        group_size: int = 2,
        contrast: tuple[float, float] = (0.0, 0.0),
        max_logit_scale: float = 100.0,
        **optim,
    ):
        super().__init__(**optim)
        self.save_hyperparameters()
        self.tokenizer = build_toy_tokenizer()
        self.clip = build_clip(
            self.tokenizer, text, vision, projection_dim, self.resolution, patch_size
        )
        self.dense_prob, self.group_size, self.contrast = dense_prob, group_size, tuple(contrast)
        self.max_log_scale = math.log(max_logit_scale)

    collate = staticmethod(collate_captioned)

    @property
    def model(self):
        return self.clip

    def train_dataset(self, size: int, seed: int) -> Dataset:
        return CaptionedRenders(
            size, seed, self.resolution, self.dense_prob, self.group_size, self.contrast
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        tokens = self.tokenizer(
            batch["caption"], padding="max_length", truncation=True, return_tensors="pt"
        ).to(self.device)
        output = self.clip(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=normalise(batch["image"], CLIP_MEAN, CLIP_STD),
        )
        logits = output.logits_per_text  # [captions, images]
        match = batch["match"]
        loss = (soft_cross_entropy(logits, match) + soft_cross_entropy(logits.T, match.T)) / 2
        hits = match[torch.arange(len(match)), logits.argmax(1)].float().mean()
        self.log_train(loss, t2i_acc=hits, logit_scale=self.clip.logit_scale.exp())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():  # CLIP clips its temperature at 100
            self.clip.logit_scale.clamp_(0, self.max_log_scale)

    def export(self, folder: Path) -> None:
        """CLIPModel + tokenizer + a CLIPImageProcessor (no torchvision needed) in one folder;
        `CLIPTextModel.from_pretrained(folder)` loads the text tower alone."""
        from transformers import CLIPImageProcessor

        self.clip.eval().save_pretrained(folder, safe_serialization=True)
        save_toy_tokenizer(self.tokenizer, folder)
        side = self.resolution
        CLIPImageProcessor(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        ).save_pretrained(folder)

    @staticmethod
    def evaluate(folder: Path, seed: int) -> tuple[dict[str, float], Image.Image]:
        from t2ilab.metrics.embedders import ClipEmbedder

        embedder = ClipEmbedder.from_pretrained(folder, local_files_only=True)
        return quality.clip_quality(embedder, seed), quality.clip_grid(embedder, seed)


class DinoPretrain(ToyPretrainModule):
    """A small ResNet, self-supervised: NT-Xent (SimCLR) on the pooled embedding between two
    views of one object (other background, size, position, pose). The embedding itself is
    trained (no projection head), since the metric compares it; objects that look the same are
    positives, not negatives."""

    def __init__(
        self,
        backbone: dict,
        temperature: float = 0.1,
        extras_prob: float = 0.25,
        degrade_prob: float = 0.0,
        **optim,
    ):
        super().__init__(**optim)
        self.save_hyperparameters()
        self.net = build_dino(**backbone)
        self.temperature, self.extras_prob = temperature, extras_prob
        self.degrade_prob = degrade_prob

    collate = staticmethod(collate_views)

    @property
    def model(self):
        return self.net

    def train_dataset(self, size: int, seed: int) -> Dataset:
        return ObjectViews(size, seed, self.resolution, self.extras_prob, self.degrade_prob)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = normalise(images, IMAGENET_MEAN, IMAGENET_STD)
        return F.normalize(image_embedding(self.net, pixels), dim=-1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        views = batch["views"]  # [B, 2, 3, H, W]
        n = len(views)
        features = self.embed(views.transpose(0, 1).flatten(0, 1))  # first views, then second
        sims = features @ features.T / self.temperature
        self_pairs = torch.eye(2 * n, dtype=torch.bool, device=sims.device)
        positives = batch["same"].repeat(2, 2) & ~self_pairs
        loss = soft_cross_entropy(sims.masked_fill(self_pairs, -1e4), positives)
        top1 = positives[torch.arange(2 * n), sims.masked_fill(self_pairs, -1e4).argmax(1)]
        self.log_train(loss, top1=top1.float().mean())
        return loss

    def export(self, folder: Path) -> None:
        """The ResNetModel + a ViTImageProcessor (a plain resize and the ImageNet normalisation
        it trained with; `DinoEmbedder` uses the same one when the processor is absent)."""
        from transformers import ViTImageProcessor

        self.net.eval().save_pretrained(folder, safe_serialization=True)
        side = self.resolution
        ViTImageProcessor(
            size={"height": side, "width": side},
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
        ).save_pretrained(folder)

    @staticmethod
    def evaluate(folder: Path, seed: int) -> tuple[dict[str, float], Image.Image]:
        from t2ilab.metrics.embedders import DinoEmbedder

        embedder = DinoEmbedder.from_pretrained(folder, local_files_only=True)
        return quality.dino_quality(embedder, seed), quality.dino_grid(embedder, seed)
