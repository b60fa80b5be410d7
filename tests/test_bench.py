"""The training benchmark (python -m t2ilab.bench) on tiny_sd: the CLI writes sane figures, and
--cache really takes the VAE and the text encoder out of the timed step."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL

from t2ilab import bench


def _assert_positive_finite(row):
    for key in ("steps_per_s", "samples_per_s", "peak_mem_mib", "seconds", "final_loss"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])


@pytest.mark.slow
def test_cli_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "t2ilab.bench", "--steps", "2", "--warmup", "1"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| steps/s |" in done.stdout
    result = json.loads(out.read_text())
    for key in ("torch", "device", "cpu_count", "threads"):
        assert result["environment"][key]
    (row,) = result["rows"]
    assert row["model"] == "tiny_sd" and row["resolution"] == 64 and row["batch_size"] == 1
    assert row["steps"] == 2 and row["trainable_params"] > 0
    _assert_positive_finite(row)


@pytest.mark.parametrize("cache", [False, True])
def test_cache_skips_vae(monkeypatch, cache):
    calls = []
    encode = AutoencoderKL.encode

    def counting_encode(self, *args, **kwargs):
        calls.append(args[0].shape)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    row = bench.run_benchmark(steps=2, warmup=1, cache=cache, method="lora", device="cpu")
    # With the cache the VAE runs once, before timing (to fill it); without, once per step
    # (the FLOP count's untimed step, 1 warm-up, 2 timed).
    assert len(calls) == (1 if cache else 4)
    assert row["cache"] is cache and row["method"] == "lora"
    _assert_positive_finite(row)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--precision", "fp16", "--device", "cpu"])


def test_cache_speedup_pairs_rows():
    rows = [
        {"batch_size": 1, "gradient_checkpointing": False, "cache": False, "steps_per_s": 2.0},
        {"batch_size": 1, "gradient_checkpointing": False, "cache": True, "steps_per_s": 3.0},
    ]
    assert bench.cache_speedups(rows) == [
        {"batch_size": 1, "gradient_checkpointing": False, "ratio": 1.5}
    ]


@pytest.mark.slow
def test_sd15_shape_has_sd15_parameter_counts():
    components = bench.build_components("sd15_shape")

    def count(module):
        return sum(p.numel() for p in module.parameters())

    # The published SD 1.5 checkpoint's counts (UNet, VAE, CLIP ViT-L/14 text tower).
    assert count(components.unet) == 859_520_964
    assert count(components.vae) == 83_653_863
    assert count(components.text_encoder) == 123_060_480


def test_step_flops_are_the_denoisers_forward_and_backward():
    """FLOPs of the step, counted by FlopCounterMode: with the cache, about 3x the UNet's forward
    (backward costs two forwards, less the input gradient of the first layer); without it, the
    VAE encoder's and text encoder's forwards more, which are frozen (no backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    module = bench.build_module(bench.build_components("tiny_sd"), "full")
    device = torch.device("cpu")
    cached = bench.make_batch(module, 2, 64, device, cache=True)
    step = bench.step_flops(module, cached, device, None)

    def counted(fn):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    latents = torch.randn_like(cached["latent_mean"])
    unet_forward = counted(lambda: module.unet(latents, torch.tensor([1, 2]), cached["condition"]))
    assert 2.7 * unet_forward < step <= 3.0 * unet_forward

    uncached = bench.make_batch(module, 2, 64, device, cache=False)
    encoders = counted(lambda: module.vae.encode(uncached["pixel_values"])) + counted(
        lambda: module.text_encoder(uncached["input_ids"])
    )
    extra = bench.step_flops(module, uncached, device, None) - step
    assert extra == pytest.approx(encoders, rel=0.02)


def test_mfu_uses_the_given_peak():
    cpu = torch.device("cpu")
    assert bench.mfu(2e12, cpu, peak_tflops=4.0) == pytest.approx(0.5)
    assert bench.mfu(2e12, cpu, peak_tflops=None) is None  # no known peak for a CPU


@pytest.mark.parametrize("method", ["full", "lora"])
def test_tiny_pixart_step_is_timed(method):
    """The PixArt family's step (transformer on T5 features with their mask) through the same
    timer: with the cache, the text encoder does not run in the timed steps."""
    row = bench.run_benchmark(
        model="tiny_pixart", method=method, steps=2, warmup=1, cache=True, device="cpu"
    )
    assert row["model"] == "tiny_pixart" and row["resolution"] == 64
    _assert_positive_finite(row)
    assert row["tflop_per_step"] > 0


def test_pixart_alpha_512_shape_is_the_real_transformer():
    """PixArt-XL-2's transformer: the real config's keys and values (real_shapes_pixart has the
    published Sigma-512 one; alpha-512 shares the architecture), 0.61B parameters as the paper
    states, counted on the meta device so nothing is allocated; the stand-in text encoder has
    T5-XXL's width, which is what the transformer's caption projection reads."""
    from diffusers import PixArtTransformer2DModel
    from real_shapes_pixart import SIGMA_512_TRANSFORMER

    tiny = bench.PIXART_ALPHA_512_SHAPE["tiny"]
    for key, value in tiny["transformer"].items():
        assert SIGMA_512_TRANSFORMER[key] == value, key
    with torch.device("meta"):
        transformer = PixArtTransformer2DModel(**tiny["transformer"])
    assert sum(p.numel() for p in transformer.parameters()) == 610_856_096
    assert tiny["text_encoder"]["d_model"] == tiny["transformer"]["caption_channels"] == 4096
    assert tiny["vae"] == bench.SD15_SHAPE["vae"]


def test_pixart_alpha_512_shape_needs_the_cache():
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "pixart_alpha_512_shape", "--device", "cpu"])
    with pytest.raises(ValueError, match="--cache"):
        bench.run_benchmark(model="pixart_alpha_512_shape", cache=False, device="cpu")
