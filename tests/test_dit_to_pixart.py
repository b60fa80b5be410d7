"""PixArt-α re-parameterisation (sec. 2.3): a PixArt transformer initialised from a DiT computes
the DiT's function for one (class, timestep), whatever the caption."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from t2ilab.errors import UserError
from t2ilab.models.dit_to_pixart import (
    DIT_XL_2_256_CONFIG,
    adaln_parameter_report,
    convert_dit_to_pixart,
    load_dit,
    pixart_config_from_dit,
)

TINY = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)
NULL = TINY["num_embeds_ada_norm"]  # DiT's dropped-label class id
CAPTION = 32  # small stand-in for T5's 4096 caption channels


def random_dit(seed: int = 0, scale: float = 0.15, **overrides) -> DiTTransformer2DModel:
    """A tiny DiT whose every weight (zero-initialised or not) is randomised."""
    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(scale * torch.randn_like(p))
    return dit


def outputs(dit, pixart, t: int, label: int, seed: int = 1, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g).to(next(dit.parameters()).dtype)
    caption = torch.randn(batch, 5, CAPTION, generator=g).to(x.dtype)
    ts = torch.full((batch,), t)
    with torch.no_grad():
        ref = dit(x, timestep=ts, class_labels=torch.full((batch,), label)).sample
        out = pixart(x, encoder_hidden_states=caption, timestep=ts).sample
    return ref, out


def test_config_keeps_dit_shape():
    cfg = pixart_config_from_dit(TINY, caption_channels=CAPTION)
    for key in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels"):
        assert cfg[key] == TINY[key]
    assert (cfg["num_layers"], cfg["sample_size"], cfg["patch_size"]) == (2, 8, 2)
    assert cfg["norm_type"] == "ada_norm_single" and cfg["cross_attention_dim"] == 16
    assert cfg["use_additional_conditions"] is False and cfg["interpolation_scale"] == 1
    # out_channels=None in DiT means "same as in_channels".
    assert pixart_config_from_dit({**TINY, "out_channels": None})["out_channels"] == 4
    with pytest.raises(UserError, match="hidden size"):
        pixart_config_from_dit(TINY, cross_attention_dim=32, caption_channels=CAPTION)
    with pytest.raises(UserError, match="not a DiT"):
        pixart_config_from_dit({**TINY, "norm_type": "ada_norm_single"})


def test_output_equals_dit_for_null_class_at_t500_any_caption():
    dit = random_dit()
    pixart = convert_dit_to_pixart(dit, caption_channels=CAPTION)
    assert isinstance(pixart, PixArtTransformer2DModel)
    ref, out = outputs(dit, pixart, t=500, label=NULL)
    assert ref.shape == out.shape == (3, 8, 8, 8)
    assert ref.abs().max() > 0.5  # a meaningful comparison, not two zero tensors
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Another caption: the zeroed cross-attention output projection adds exactly nothing.
    _, out2 = outputs(dit, pixart, t=500, label=NULL, seed=7)
    ref2, _ = outputs(dit, pixart, t=500, label=NULL, seed=7)
    torch.testing.assert_close(out2, ref2, atol=1e-5, rtol=1e-5)
    for block in pixart.transformer_blocks:
        assert not block.attn2.to_out[0].weight.any() and not block.attn2.to_out[0].bias.any()
        assert block.attn2.to_q.weight.abs().sum() > 0  # default init, not zero
    assert pixart.caption_projection.linear_1.weight.abs().sum() > 0


def test_exact_in_float64():
    dit = random_dit(seed=3).double()
    pixart = convert_dit_to_pixart(dit, caption_channels=CAPTION)
    assert pixart.dtype == torch.float64
    ref, out = outputs(dit, pixart, t=500, label=NULL)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_equality_is_specific_to_the_chosen_timestep():
    """As in the paper: one global MLP reproduces the per-block adaLN-Zero MLPs at one t only."""
    dit = random_dit()
    pixart = convert_dit_to_pixart(dit, caption_channels=CAPTION)
    for t in (100, 900):
        ref, out = outputs(dit, pixart, t=t, label=NULL)
        assert (out - ref).abs().max() > 1e-2
    at_100 = convert_dit_to_pixart(dit, timestep=100, caption_channels=CAPTION)
    ref, out = outputs(dit, at_100, t=100, label=NULL)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_class_label_argument():
    dit = random_dit(seed=5)
    pixart = convert_dit_to_pixart(dit, class_label=3, caption_channels=CAPTION)
    ref, out = outputs(dit, pixart, t=500, label=3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    null_ref, _ = outputs(dit, pixart, t=500, label=NULL)
    assert (out - null_ref).abs().max() > 1e-2
    for bad in (-1, NULL + 1):
        with pytest.raises(UserError, match="class_label"):
            convert_dit_to_pixart(dit, class_label=bad)


def test_first_block_global_mlp_and_no_caption_projection():
    dit = random_dit(seed=2)
    pixart = convert_dit_to_pixart(
        dit, caption_channels=None, cross_attention_dim=CAPTION, global_mlp="first"
    )
    assert pixart.caption_projection is None
    torch.testing.assert_close(
        pixart.adaln_single.linear.weight, dit.transformer_blocks[0].norm1.linear.weight
    )
    ref, out = outputs(dit, pixart, t=500, label=NULL)  # raw 32-d encoder states
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_training_mode_dit_is_converted_without_label_dropout():
    dit = random_dit(seed=4)
    expected = convert_dit_to_pixart(dit, caption_channels=CAPTION).state_dict()
    dit.train()  # LabelEmbedding drops labels at random in training mode
    for _ in range(3):
        got = convert_dit_to_pixart(dit, caption_channels=CAPTION).state_dict()
        for key in ("scale_shift_table", "transformer_blocks.1.scale_shift_table"):
            torch.testing.assert_close(got[key], expected[key])


def test_half_precision_dit_keeps_dtype():
    dit = random_dit(seed=6)
    pixart = convert_dit_to_pixart(dit.to(torch.bfloat16), caption_channels=CAPTION)
    assert pixart.dtype == torch.bfloat16
    ref, out = outputs(dit, pixart, t=500, label=NULL)
    torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0.05)


def test_save_reload_and_layer_norm_eps(tmp_path):
    """PixArt has one norm_eps (1e-6 here, as in diffusers' AdaLayerNormZero); DiT's pre-MLP
    LayerNorm uses its config norm_eps (default 1e-5). The conversion sets that block norm's eps
    on the module (exact), which a save/reload does not keep: a ~1e-6 relative change."""
    dit = random_dit()
    pixart = convert_dit_to_pixart(dit, caption_channels=CAPTION)
    assert pixart.transformer_blocks[0].norm2.eps == dit.config.norm_eps == 1e-5
    pixart.save_pretrained(tmp_path / "a")
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path / "a").eval()
    ref, out = outputs(dit, reloaded, t=500, label=NULL)
    assert 0 < (out - ref).abs().max() < 1e-3 * ref.abs().max()

    dit6 = random_dit(norm_eps=1e-6)  # nothing to override -> exact after a round trip too
    pixart6 = convert_dit_to_pixart(dit6, caption_channels=CAPTION)
    pixart6.save_pretrained(tmp_path / "b")
    reloaded6 = PixArtTransformer2DModel.from_pretrained(tmp_path / "b").eval()
    ref, out = outputs(dit6, reloaded6, t=500, label=NULL)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_parameter_report_dit_xl_2():
    """DiT-XL/2 shape on the meta device (no weights allocated).

    Paper (PixArt-α sec. 2.3): 833M -> 611M. Here:
    - PixArt-α-shaped model (adaLN-single, cross-attention, T5-XXL 4096 -> 1152 caption
      projection, no resolution/aspect embedders): 610,856,096 = 611M, as in the paper.
    - The same text model with per-block adaLN-Zero (28 x 1152 -> 6912 linears + final
      1152 -> 2304) instead: 828,494,240 (828.5M), 26.3% more than 611M. The paper's 833M is
      ~4.5M (0.5%) larger; the components counted here do not explain it exactly (the paper's
      count may include e.g. the class embedding (1.15M) or keep the global MLP too: 611M +
      28 x 7.97M = 834.0M). The reduction (26%) matches.
    - The class-conditional DiT itself: 674,834,720 (675M, the DiT paper's XL/2) with one shared
      timestep+class embedder; diffusers' DiTTransformer2DModel keeps one copy per block,
      749,826,464 in memory.
    """
    report = adaln_parameter_report(DIT_XL_2_256_CONFIG)
    assert report["dit_adaln_zero_per_block"] == 1152 * 6912 + 6912 == 7_969_536
    assert report["dit_adaln_zero_final"] == 1152 * 2304 + 2304 == 2_656_512
    assert report["dit_adaln_zero"] == 225_803_520
    assert report["dit_condition_embedders_per_copy"] == 2_777_472
    assert report["dit_total"] == 749_826_464
    assert report["dit_total_shared_embedders"] == 674_834_720
    assert report["pixart_adaln_single_linear"] == 7_969_536
    assert report["pixart_scale_shift_tables"] == 28 * 6 * 1152 + 2 * 1152 == 195_840
    assert report["pixart_adaln_single"] == 8_165_376
    assert report["pixart_timestep_embedder"] == 1_624_320
    assert report["pixart_cross_attention"] == 28 * (4 * 1152 * 1152 + 4 * 1152) == 148_764_672
    assert report["pixart_caption_projection"] == 4096 * 1152 + 1152 + 1152 * 1152 + 1152
    assert report["pixart_total"] == 610_856_096
    assert report["adaln_zero_text_total"] == 828_494_240
    assert report["adaln_reduction_fraction"] == pytest.approx(0.2627, abs=1e-4)


def test_parameter_report_matches_real_models():
    dit = random_dit()
    pixart = convert_dit_to_pixart(dit, caption_channels=CAPTION)
    report = adaln_parameter_report(dit, pixart)
    assert report == adaln_parameter_report(
        dict(dit.config), pixart_config_from_dit(dit.config, caption_channels=CAPTION)
    )
    assert report["dit_total"] == sum(p.numel() for p in dit.parameters())
    assert report["pixart_total"] == sum(p.numel() for p in pixart.parameters())
    D = 16
    assert report["dit_adaln_zero"] == 2 * (D * 6 * D + 6 * D) + D * 2 * D + 2 * D
    assert report["pixart_adaln_single"] == D * 6 * D + 6 * D + 2 * 6 * D + 2 * D


def _write_pipeline(root, dit):
    dit.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "DiTPipeline", "transformer": ["diffusers", "Transformer2DModel"]}
        )
    )


def test_load_dit_from_pipeline_and_transformer_folders(tmp_path):
    dit = random_dit()
    _write_pipeline(tmp_path / "pipe", dit)
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "transformer", str(tmp_path / "pipe")):
        loaded = load_dit(path)
        assert isinstance(loaded, DiTTransformer2DModel)
        torch.testing.assert_close(loaded.proj_out_1.weight, dit.proj_out_1.weight)
    # facebook/DiT-* hub configs say "Transformer2DModel" (legacy class) with ada_norm_zero.
    cfg_path = tmp_path / "pipe" / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "Transformer2DModel"}))
    assert load_dit(tmp_path / "pipe").config.num_layers == 2


def _one_line_user_error(path, match):
    with pytest.raises(UserError, match=match) as info:
        load_dit(path)
    assert "\n" not in str(info.value)


def test_load_dit_rejects_other_folders(tmp_path, monkeypatch):
    torch.manual_seed(0)
    PixArtTransformer2DModel(**pixart_config_from_dit(TINY, caption_channels=None)).save_pretrained(
        tmp_path / "pixart"
    )
    _one_line_user_error(tmp_path / "pixart", "not a DiT")
    (tmp_path / "empty").mkdir()
    _one_line_user_error(tmp_path / "empty", "not a DiT folder")
    _one_line_user_error(tmp_path / "missing", "not a DiT folder")
    # A DiT config whose weights are not DiT weights (here: none that match).
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({**TINY}))
    _one_line_user_error(tmp_path / "noweights", "DiT")
    # DiT weights with a tensor missing: diffusers would initialise it at random, with a warning.
    from safetensors.torch import load_file, save_file

    random_dit().save_pretrained(tmp_path / "partial")
    weights = tmp_path / "partial" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["proj_out_1.weight"]
    save_file(state, weights)
    _one_line_user_error(tmp_path / "partial", "1 missing")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _one_line_user_error("no-such-org/no-such-dit", "hub id")
