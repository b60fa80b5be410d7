"""PixArt-α re-parameterisation: a text-conditioned PixArt transformer initialised from a
class-conditional DiT (Chen et al. 2023, "PixArt-α", sec. 2.3 "Re-parameterization").

DiT (diffusers `DiTTransformer2DModel`, adaLN-Zero) gives every block b its own modulation
MLP:  ``m_b = block.norm1.linear(silu(t_emb(t) + y_emb(y)))``, chunked (in this order) into
``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp`` and used as
``norm(x) * (1 + scale) + shift`` and ``x + gate * sublayer(...)``. The final layer has its own
``proj_out_1(silu(emb)) -> (shift, scale)``.

PixArt (diffusers `PixArtTransformer2DModel`, adaLN-single) computes ONE global
``g = adaln_single.linear(silu(e))`` with ``e = adaln_single.emb(t)`` (no class label) and each
block uses ``scale_shift_table_b + g.reshape(6, D)``, chunked in the same order with the same
``(1 + scale)`` / gate conventions; the final layer uses ``scale_shift_table (2, D) + e``
chunked into ``(shift, scale)``.

`convert_dit_to_pixart` copies everything the two share (patch embedding, self-attention,
feed-forward, output projection, the timestep MLP) and sets the tables so that, for one class
label (default: DiT's null / "unconditional" class) at one timestep (default t=500, as in the
paper), every block and the final layer get exactly DiT's shift/scale/gate:
``scale_shift_table_b = (m_b - g).reshape(6, D)`` and
``final_table = [shift_final - e, scale_final - e]``. The new cross-attention starts with a
zero output projection, so the converted model computes exactly the DiT's function for that
(class, t), whatever the caption. At other timesteps the two differ (one global MLP cannot
reproduce 28 per-block MLPs), which is what the paper describes as well.

Numerical detail: diffusers' AdaLayerNormZero normalises with a hard-coded eps=1e-6, while DiT's
pre-MLP LayerNorm (``norm3``) uses ``config.norm_eps`` (1e-5 by default); PixArt's ``norm1`` and
``norm2`` share ONE ``config.norm_eps``. The converted config uses 1e-6 (PixArt-α's and the
original DiT code's value); when the DiT's ``norm3`` eps differs, each block's ``norm2.eps`` is
set on the module so the conversion is exact. That override is not part of the config: a
``save_pretrained``/``from_pretrained`` round trip reverts it to 1e-6, which changes outputs by
~1e-5 relative (5e-6 on the tiny random test model; tests/test_dit_to_pixart.py bounds it).
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from t2ilab.errors import UserError

# diffusers DiTTransformer2DModel configuration of facebook/DiT-XL-2-256 (DiT-XL/2 at 256px:
# 28 blocks, hidden 1152 = 16 heads x 72, latent 32x32x4, learned sigma -> 8 output channels).
DIT_XL_2_256_CONFIG: dict[str, Any] = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
    attention_bias=True,
    activation_fn="gelu-approximate",
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
)

# Eps of the LayerNorm inside diffusers' AdaLayerNormZero (hard-coded there) and PixArt-α's value.
_ADALN_EPS = 1e-6


def _dit_defaults() -> dict[str, Any]:
    sig = inspect.signature(DiTTransformer2DModel.__init__)
    return {
        k: p.default
        for k, p in sig.parameters.items()
        if k != "self" and p.default is not inspect.Parameter.empty
    }


def _full_dit_config(dit_config: Any) -> dict[str, Any]:
    """The DiT config with diffusers' defaults filled in (hub configs omit defaulted keys)."""
    if isinstance(dit_config, DiTTransformer2DModel):
        dit_config = dit_config.config
    cfg = _dit_defaults()
    cfg.update({k: v for k, v in dict(dit_config).items() if not k.startswith("_")})
    if cfg.get("norm_type") != "ada_norm_zero":
        raise UserError(
            f"not a DiT config: norm_type={cfg.get('norm_type')!r}, expected 'ada_norm_zero' "
            "(a class-conditional DiTTransformer2DModel)"
        )
    if cfg.get("num_embeds_ada_norm") is None or cfg.get("patch_size") is None:
        raise UserError("not a DiT config: num_embeds_ada_norm and patch_size must be set")
    return cfg


def pixart_config_from_dit(
    dit_config: Any,
    cross_attention_dim: int | None = None,
    caption_channels: int | None = 4096,
) -> dict[str, Any]:
    """`PixArtTransformer2DModel` kwargs with the DiT's shape (patch size, width, depth, heads,
    in/out channels, sample size, MLP activation) plus cross-attention.

    `dit_config`: a DiT model, its `.config`, or a plain dict (missing keys take diffusers'
    DiT defaults). `caption_channels`: width of the text-encoder features (4096 = T5-XXL, as in
    PixArt-α); they are projected to the hidden size, so cross-attention then attends to
    hidden-size tokens and `cross_attention_dim` must be None or the hidden size. With
    `caption_channels=None` there is no caption projection and `cross_attention_dim`
    (default: hidden size) is the width of `encoder_hidden_states` as given.
    """
    cfg = _full_dit_config(dit_config)
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cross_attention_dim is None:
        cross_attention_dim = inner
    if caption_channels is not None and cross_attention_dim != inner:
        raise UserError(
            f"cross_attention_dim={cross_attention_dim} must equal the hidden size {inner} when "
            f"caption_channels={caption_channels} (PixArt projects captions to the hidden size); "
            "leave it unset, or set caption_channels=None to feed encoder states directly"
        )
    return dict(
        num_attention_heads=cfg["num_attention_heads"],
        attention_head_dim=cfg["attention_head_dim"],
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"] if cfg["out_channels"] is not None else cfg["in_channels"],
        num_layers=cfg["num_layers"],
        dropout=cfg["dropout"],
        norm_num_groups=cfg["norm_num_groups"],
        cross_attention_dim=cross_attention_dim,
        attention_bias=cfg["attention_bias"],
        sample_size=cfg["sample_size"],
        patch_size=cfg["patch_size"],
        activation_fn=cfg["activation_fn"],
        num_embeds_ada_norm=cfg["num_embeds_ada_norm"],
        upcast_attention=cfg["upcast_attention"],
        norm_type="ada_norm_single",
        norm_elementwise_affine=cfg["norm_elementwise_affine"],
        norm_eps=_ADALN_EPS,
        # DiT's PatchEmbed uses interpolation_scale=1; PixArt's default (sample_size // 64)
        # would change the sin-cos position table for sample_size >= 128.
        interpolation_scale=1,
        # Resolution / aspect-ratio embedders (PixArt-α 1024px) have no DiT counterpart.
        use_additional_conditions=False,
        caption_channels=caption_channels,
        attention_type="default",
    )


def _linear(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if linear.bias is None else linear.bias.to(x.dtype)
    return F.linear(x, linear.weight.to(x.dtype), bias)


def _dit_embedding(norm1, t: torch.Tensor, label: torch.Tensor, dtype) -> torch.Tensor:
    """`CombinedTimestepLabelEmbeddings.forward` in `dtype`, without label dropout."""
    emb = norm1.emb
    t_proj = emb.time_proj(t).to(dtype)
    te = copy.deepcopy(emb.timestep_embedder).to(dtype)
    table = emb.class_embedder.embedding_table.weight
    return te(t_proj) + table[label].to(dtype)


@torch.no_grad()
def convert_dit_to_pixart(
    dit: DiTTransformer2DModel,
    class_label: int | None = None,
    timestep: int = 500,
    cross_attention_dim: int | None = None,
    caption_channels: int | None = 4096,
    *,
    global_mlp: Literal["mean", "first"] = "mean",
) -> PixArtTransformer2DModel:
    """A `PixArtTransformer2DModel` that reproduces `dit` exactly for `class_label` (default:
    the null class, id `num_embeds_ada_norm`) at `timestep`, for any caption.

    Copied: patch embedding, self-attention (attn1), feed-forward (ff), affine LayerNorm weights
    (if `norm_elementwise_affine`), output projection (proj_out_2 -> proj_out) and the timestep
    MLP (block 0's, the one DiT's final layer uses) into `adaln_single.emb`.
    `adaln_single.linear` is the mean of the DiT blocks' adaLN-Zero linears (`global_mlp="mean"`,
    the least-squares single map) or block 0's (`"first"`); it only sets how modulation varies
    with t, as the tables make the (class, timestep) modulation exact.
    New: cross-attention (attn2, output projection zeroed so it starts as identity) and the
    caption projection (default init). The result is in `dit`'s dtype and on its device.
    """
    if not isinstance(dit, DiTTransformer2DModel):
        raise UserError(f"expected a DiTTransformer2DModel, got {type(dit).__name__}")
    if global_mlp not in ("mean", "first"):
        raise UserError(f"global_mlp={global_mlp!r} is not one of 'mean', 'first'")
    pix_cfg = pixart_config_from_dit(dit.config, cross_attention_dim, caption_channels)
    blocks = dit.transformer_blocks
    n_rows = blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
    if class_label is None:
        class_label = dit.config.num_embeds_ada_norm  # the dropped-label ("null") class
    if not 0 <= int(class_label) < n_rows:
        raise UserError(f"class_label={class_label} is outside the DiT's classes 0..{n_rows - 1}")
    param = next(dit.parameters())
    device, dtype = param.device, param.dtype
    if device.type == "meta":
        raise UserError("the DiT has no weights (meta device): load it before converting")

    # Tables are computed in float32 (float64 for a float64 DiT), then cast to the DiT's dtype.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.device(device):
        pixart = torch.nn.Module.to(PixArtTransformer2DModel(**pix_cfg), dtype=work)
    D = pixart.inner_dim
    t = torch.tensor([timestep], device=device)
    y = torch.tensor([int(class_label)], device=device)

    # Shared layers.
    pixart.pos_embed.proj.load_state_dict(dit.pos_embed.proj.state_dict())
    dit_pos = dit.pos_embed.pos_embed
    if not torch.equal(pixart.pos_embed.pos_embed.to(dit_pos.dtype), dit_pos):
        raise RuntimeError("PixArt and DiT position tables differ; unexpected PatchEmbed config")
    pixart.proj_out.load_state_dict(dit.proj_out_2.state_dict())
    for src, dst in zip(blocks, pixart.transformer_blocks, strict=True):
        dst.attn1.load_state_dict(src.attn1.state_dict())
        dst.ff.load_state_dict(src.ff.state_dict())
        # DiT norm3 (pre-MLP LayerNorm) is PixArt norm2; DiT's pre-attention norm is the
        # affine-free LayerNorm inside AdaLayerNormZero, PixArt's norm1.
        dst.norm2.load_state_dict(src.norm3.state_dict())
        if dst.norm2.eps != src.norm3.eps:
            dst.norm2.eps = src.norm3.eps
        if dst.norm1.eps != src.norm1.norm.eps:
            dst.norm1.eps = src.norm1.norm.eps
        # New cross-attention: zero output projection -> adds exactly 0 at initialisation.
        dst.attn2.to_out[0].weight.zero_()
        if dst.attn2.to_out[0].bias is not None:
            dst.attn2.to_out[0].bias.zero_()

    # Global adaLN-single MLP.
    pixart.adaln_single.emb.timestep_embedder.load_state_dict(
        blocks[0].norm1.emb.timestep_embedder.state_dict()
    )
    if global_mlp == "mean":
        w = torch.stack([b.norm1.linear.weight.to(work) for b in blocks]).mean(0)
        bias = torch.stack([b.norm1.linear.bias.to(work) for b in blocks]).mean(0)
    else:
        w, bias = blocks[0].norm1.linear.weight, blocks[0].norm1.linear.bias
    pixart.adaln_single.linear.weight.copy_(w)
    pixart.adaln_single.linear.bias.copy_(bias)
    g, e = pixart.adaln_single(t, None, batch_size=1, hidden_dtype=work)

    # Per-block tables: table_b + g == DiT block b's modulation at (class_label, timestep).
    for src, dst in zip(blocks, pixart.transformer_blocks, strict=True):
        m = _linear(src.norm1.linear, F.silu(_dit_embedding(src.norm1, t, y, work)))
        dst.scale_shift_table.copy_((m - g).reshape(6, D))

    # Final layer: DiT's proj_out_1(silu(emb of block 0)) -> (shift, scale); PixArt adds e.
    final = _linear(dit.proj_out_1, F.silu(_dit_embedding(blocks[0].norm1, t, y, work)))
    pixart.scale_shift_table.copy_(final.reshape(2, D) - e)

    if dtype != work:  # nn.Module.to: diffusers' .to() warns about fp32 modules (there are none)
        torch.nn.Module.to(pixart, dtype=dtype)
    return pixart.train(dit.training)


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _as_dit(dit_config_or_model: Any) -> DiTTransformer2DModel:
    if isinstance(dit_config_or_model, DiTTransformer2DModel):
        return dit_config_or_model
    cfg = _full_dit_config(dit_config_or_model)
    with torch.device("meta"):
        return DiTTransformer2DModel(**cfg)


def adaln_parameter_report(
    dit_config_or_model: Any, pixart_model: PixArtTransformer2DModel | dict | None = None
) -> dict[str, int | float]:
    """Parameter counts of adaLN-Zero (DiT) vs adaLN-single (PixArt).

    Configs are instantiated on the meta device (no memory). `pixart_model` may be a model, a
    config dict, or None (= `pixart_config_from_dit(dit)`, T5-XXL caption projection). Keys:

    - ``dit_adaln_zero``: per-block adaLN-Zero linears (D -> 6D) + final proj_out_1 (D -> 2D).
    - ``dit_condition_embedders``: timestep + class embedders; diffusers' DiT keeps one copy
      per block (``..._per_copy`` is one), the original DiT code one shared copy.
    - ``dit_total`` (diffusers layout) and ``dit_total_shared_embedders`` (original layout).
    - ``pixart_adaln_single``: the global linear (D -> 6D) + all scale_shift_tables;
      ``pixart_timestep_embedder``, ``pixart_cross_attention``, ``pixart_caption_projection``,
      ``pixart_total``.
    - ``adaln_zero_text_total``: the same text-conditioned model with per-block adaLN-Zero
      instead of adaLN-single (the paper's "before" model), and ``adaln_reduction_fraction``.
    """
    dit = _as_dit(dit_config_or_model)
    if pixart_model is None or isinstance(pixart_model, dict):
        cfg = pixart_config_from_dit(dit.config) if pixart_model is None else pixart_model
        with torch.device("meta"):
            pixart_model = PixArtTransformer2DModel(**cfg)
    blocks = dit.transformer_blocks
    dit_adaln = sum(_count(b.norm1.linear) for b in blocks) + _count(dit.proj_out_1)
    emb_copy = _count(blocks[0].norm1.emb)
    emb_all = sum(_count(b.norm1.emb) for b in blocks)
    dit_total = _count(dit)
    pix_blocks = pixart_model.transformer_blocks
    tables = pixart_model.scale_shift_table.numel() + sum(
        b.scale_shift_table.numel() for b in pix_blocks
    )
    pix_adaln = _count(pixart_model.adaln_single.linear) + tables
    pix_total = _count(pixart_model)
    before = pix_total - pix_adaln + dit_adaln
    return {
        "dit_adaln_zero": dit_adaln,
        "dit_adaln_zero_per_block": _count(blocks[0].norm1.linear),
        "dit_adaln_zero_final": _count(dit.proj_out_1),
        "dit_condition_embedders": emb_all,
        "dit_condition_embedders_per_copy": emb_copy,
        "dit_total": dit_total,
        "dit_total_shared_embedders": dit_total - emb_all + emb_copy,
        "pixart_adaln_single": pix_adaln,
        "pixart_adaln_single_linear": _count(pixart_model.adaln_single.linear),
        "pixart_scale_shift_tables": tables,
        "pixart_timestep_embedder": _count(pixart_model.adaln_single.emb),
        "pixart_cross_attention": sum(_count(b.attn2) for b in pix_blocks),
        "pixart_caption_projection": _count(pixart_model.caption_projection),
        "pixart_total": pix_total,
        "adaln_zero_text_total": before,
        "adaln_reduction_fraction": (before - pix_total) / before,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def _check_dit_config(cfg: dict[str, Any], where: str) -> None:
    cls = cfg.get("_class_name")
    if cls not in (None, "DiTTransformer2DModel", "Transformer2DModel"):
        raise UserError(f"{where} is a {cls}, not a DiT transformer (DiTTransformer2DModel)")
    # Legacy Transformer2DModel configs (facebook/DiT-*) must say ada_norm_zero explicitly.
    default = "ada_norm_zero" if cls in (None, "DiTTransformer2DModel") else "layer_norm"
    if cfg.get("norm_type", default) != "ada_norm_zero" or cfg.get("patch_size") is None:
        raise UserError(
            f"{where} is not a DiT transformer (needs norm_type=ada_norm_zero and a patch_size, "
            f"got norm_type={cfg.get('norm_type', default)!r}, patch_size={cfg.get('patch_size')})"
        )
    if cfg.get("cross_attention_dim") is not None:
        raise UserError(f"{where} has cross-attention; it is not a class-conditional DiT")


def load_dit(path_or_hub_id: str | Path, **kwargs: Any) -> DiTTransformer2DModel:
    """`DiTTransformer2DModel` from a DiTPipeline folder or hub id (`transformer/` subfolder,
    e.g. facebook/DiT-XL-2-256) or from a transformer folder itself. `kwargs` go to
    `from_pretrained` (e.g. `torch_dtype`). Anything else raises a one-line `UserError`."""
    ref = str(path_or_hub_id)
    folder = Path(ref).expanduser()
    if folder.is_dir():
        if (folder / "transformer" / "config.json").is_file():
            sub, cfg_path = "transformer", folder / "transformer" / "config.json"
        elif (folder / "config.json").is_file():
            sub, cfg_path = None, folder / "config.json"
        else:
            raise UserError(
                f"{ref} is not a DiT folder: no transformer/config.json or config.json "
                "(expected a DiTPipeline.save_pretrained() folder or its transformer/ folder)"
            )
        _check_dit_config(_read_json(cfg_path), ref)
        source = str(folder)
    elif folder.exists() or ref.startswith(("/", "./", "../", "~")) or ref.count("/") != 1:
        raise UserError(f"{ref} is not a DiT folder (no such directory) nor a hub id like org/name")
    else:
        from huggingface_hub import hf_hub_download

        sub = None
        cfg = None
        errors = []
        for candidate in ("transformer", None):
            name = "config.json" if candidate is None else f"{candidate}/config.json"
            try:
                cfg = _read_json(Path(hf_hub_download(ref, name, revision=kwargs.get("revision"))))
                sub = candidate
                break
            except Exception as err:  # offline, unknown repo, missing file
                errors.append(f"{name}: {type(err).__name__}")
        if cfg is None:
            raise UserError(
                f"cannot fetch a DiT config from hub id {ref} ({'; '.join(errors)}): check the id, "
                "the network / HF_HUB_OFFLINE cache, or pass a local DiTPipeline folder"
            )
        _check_dit_config(cfg, ref)
        source = ref
    try:
        model, info = DiTTransformer2DModel.from_pretrained(
            source, subfolder=sub, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError, NotImplementedError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load a DiT transformer from {ref}: {first}") from None
    missing = info.get("missing_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        raise UserError(
            f"{ref} does not hold DiT weights: {len(missing)} missing and {len(mismatched)} "
            f"mismatched tensors (e.g. {(list(missing) + list(mismatched))[:1]})"
        )
    return model


__all__ = [
    "DIT_XL_2_256_CONFIG",
    "adaln_parameter_report",
    "convert_dit_to_pixart",
    "load_dit",
    "pixart_config_from_dit",
]
