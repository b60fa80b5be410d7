"""Speed and memory defaults (issue 15): the fused Adam(W) step where the precision allows it,
clipping that still works with it under bf16-mixed, CPU threads from the free cores, and
checkpoints streamed to disk instead of serialised in memory first."""

from __future__ import annotations

import functools
import sys
import time
import tracemalloc

import hydra
import pytest
import torch
from lightning.pytorch.plugins.precision import (
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from omegaconf import OmegaConf

from t2ilab import threads
from t2ilab.build import build_trainer
from t2ilab.checkpoints import AtomicCheckpointIO
from t2ilab.errors import UserError
from t2ilab.modules.base import DiffusionModule
from t2ilab.optim import fused_where_possible


def _adamw_partial(**kw):
    cfg = OmegaConf.create({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, **kw})
    return hydra.utils.instantiate(cfg)


def _params():
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize(
    "plugin, fused",
    [
        (None, True),  # no trainer: the benchmark's bare step
        (Precision(), True),  # 32-true
        (MixedPrecision("bf16-mixed", "cpu"), True),  # no gradient scaler
        (HalfPrecision("bf16-true"), True),
        (MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")), False),
        (DoublePrecision(), False),  # not one the fused path was checked with
    ],
)
def test_adamw_is_fused_where_the_precision_allows_it(plugin, fused):
    optimizer = fused_where_possible(_adamw_partial(), plugin)(params=_params())
    assert bool(optimizer.defaults.get("fused")) is fused


def test_an_explicit_fused_setting_and_other_optimizers_are_left_alone():
    kept = fused_where_possible(_adamw_partial(fused=False))(params=_params())
    assert not kept.defaults["fused"]
    sgd = hydra.utils.instantiate(
        OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    )
    assert fused_where_possible(sgd) is sgd
    plain = functools.partial(torch.optim.AdamW, lr=1e-3)
    assert fused_where_possible(plain).keywords == {"lr": 1e-3, "fused": True}


def test_fused_adamw_takes_the_same_step_as_the_default_one():
    torch.manual_seed(0)
    a, b = _params(), None
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    fused_where_possible(_adamw_partial())(params=a).step()
    _adamw_partial()(params=b).step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q)


def test_the_config_opts_out_of_the_fused_step(tmp_path):
    from _support import compose_cfg

    overrides = ["experiment=dreambooth", "model=tiny_sd", "+method.module.optimizer.fused=false"]
    cfg = compose_cfg(overrides, tmp_path)
    factory = hydra.utils.instantiate(cfg.method.module.optimizer)
    optimizer = fused_where_possible(factory, Precision())(params=_params())
    assert optimizer.defaults["fused"] is False


class _Holder:
    """What configure_gradient_clipping reads of the module: its trainer's precision plugin."""

    def __init__(self, plugin):
        self.trainer = type("T", (), {"precision_plugin": plugin})()


def test_bf16_mixed_clips_the_gradients_of_a_fused_optimizer():
    params = _params()
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    optimizer = fused_where_possible(_adamw_partial())(params=params)
    plugin = MixedPrecision("bf16-mixed", "cpu")
    # Lightning's own path refuses (it cannot tell that no scaler is involved) ...
    with pytest.raises(RuntimeError, match="fused"):
        plugin.clip_gradients(optimizer, 1.0)
    # ... the module's clips, to the requested norm.
    DiffusionModule.configure_gradient_clipping(_Holder(plugin), optimizer, 1.0, "norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert norm == pytest.approx(1.0, rel=1e-4)


# --- CPU threads ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cores, load, ranks, expected",
    [(2, 0.2, 1, 2), (2, 1.6, 1, 1), (2, 7.0, 1, 1), (16, 3.2, 1, 13), (16, 0.0, 4, 4)],
)
def test_auto_takes_the_free_cores(cores, load, ranks, expected):
    chosen, reason = threads.choose_threads("auto", cores=cores, load=load, env={}, ranks=ranks)
    assert chosen == expected
    assert f"{cores} cores" in reason


def test_an_explicit_thread_count_wins():
    assert threads.choose_threads("auto", cores=8, load=0, env={"OMP_NUM_THREADS": "3"})[0] is None
    assert threads.choose_threads(3, cores=8, load=0, env={"OMP_NUM_THREADS": "1"})[0] == 3
    assert threads.choose_threads(None, env={})[0] is None


@pytest.mark.parametrize("bad", ["many", 0, -2, 1.5, True])
def test_a_bad_thread_setting_is_one_line(bad):
    with pytest.raises(UserError, match=r"trainer.cpu_threads=") as err:
        threads.choose_threads(bad, env={})
    assert "\n" not in str(err.value)


def test_threads_are_decided_once_per_process(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_chosen", {})
    try:
        assert threads.apply_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        assert threads.apply_cpu_threads(2) == 1  # a second run in the process keeps it
        with pytest.raises(UserError):
            threads.apply_cpu_threads("bogus")  # still checked every time
    finally:
        torch.set_num_threads(before)


def test_the_trainer_is_built_without_the_cpu_threads_key(tmp_path):
    cfg = OmegaConf.create(
        {
            "paths": {"output_dir": str(tmp_path)},
            "trainer": {
                "_target_": "lightning.pytorch.Trainer",
                "default_root_dir": "${paths.output_dir}",
                "accelerator": "cpu",
                "max_steps": 1,
                "cpu_threads": "auto",
                "enable_progress_bar": False,
            },
        }
    )
    trainer = build_trainer(cfg, loggers=[], callbacks=[])
    assert trainer.max_steps == 1 and trainer.default_root_dir == str(tmp_path)


# --- checkpoints ------------------------------------------------------------------------------


def test_a_checkpoint_is_streamed_to_disk_not_copied_in_memory(tmp_path):
    """A 32 MiB tensor checkpoint: Python-side allocations while saving stay far below its size
    (serialising into a BytesIO first allocated the whole file in memory)."""
    checkpoint = {"global_step": 1, "w": torch.randn(8 * 2**20)}
    tracemalloc.start()
    try:
        AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "last.ckpt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak
    loaded = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert torch.equal(loaded["w"], checkpoint["w"])


# --- encoders that wait on the CPU ------------------------------------------------------------


def _built_module(tmp_path, overrides):
    from _support import FAST, compose_cfg

    from t2ilab.build import build_module, prepare_data
    from t2ilab.models.loading import load_components, load_tokenizer

    cfg = compose_cfg(["experiment=dreambooth", "model=tiny_sd", *FAST, *overrides], tmp_path)
    module_class = hydra.utils.get_class(cfg.method.module._target_)
    datamodule = hydra.utils.instantiate(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    datamodule.bind(tokenizer, seed=0)
    backbone = load_components(cfg.model, tokenizer)
    prepare_data(cfg, datamodule, backbone, module_class)
    return build_module(cfg, backbone, datamodule)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], {"text_encoder", "vae"}),  # both caches on (the default)
        (["data.cache.latents=false"], {"text_encoder"}),
        (["data.cache.text=false"], {"vae"}),
        (["data.random_flip=true"], {"text_encoder"}),  # random transform: nothing to cache
    ],
)
def test_encoders_whose_features_are_cached_wait_on_the_cpu(tmp_path, overrides, expected):
    module = _built_module(tmp_path, overrides)
    names = {name for name, part in module.backbone.modules().items()}
    offloaded = {
        name
        for name in names
        if any(getattr(module, name) is part for part in module.offloaded_parts())
    }
    assert offloaded == expected


# --- logging cadence --------------------------------------------------------------------------


@pytest.mark.slow
def test_loggers_get_every_tenth_step_and_the_loss_parts_only_then(tmp_path):
    """The default trainer.log_every_n_steps=10: a 12-step run writes step 9's metrics, loss
    parts and LR included, and nothing else (each extra self.log is Lightning bookkeeping)."""
    import csv

    from _support import run_train

    run_dir = tmp_path / "run"
    done = run_train(
        [
            "experiment=dreambooth",
            "model=tiny_sd",
            "trainer.max_steps=12",
            "method.num_class_images=2",
            "sampling.num_inference_steps=2",
            "callbacks.samples.every_n_steps=0",
            "callbacks.samples.at_end=false",
            "eval=none",
            "logger=csv",
            "export.enabled=false",
        ],
        run_dir,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "csv/version_0/metrics.csv")))
    logged = [r for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in logged] == [9]
    assert logged[0]["train/lr"] and logged[0]["train/instance_loss"]


# --- channels-last ----------------------------------------------------------------------------


def test_channels_last_puts_the_unet_convolutions_in_nhwc_and_keeps_the_loss():
    from t2ilab import bench
    from t2ilab.modules.step_random import StepRandom

    losses = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        module = bench.build_module(bench.build_components("tiny_sd"), "full")
        module.channels_last = channels_last
        module.configure_model()
        convs = [  # 1x1 kernels are contiguous in both layouts
            m.weight
            for m in module.unet.modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
        ]
        nhwc = [w.is_contiguous(memory_format=torch.channels_last) for w in convs]
        assert all(nhwc) if channels_last else not any(nhwc)
        batch = bench.make_batch(module, 2, 64, torch.device("cpu"), cache=True)
        loss, _ = module.diffusion_loss(batch, StepRandom(0, (1,)))
        loss.backward()
        losses[channels_last] = (loss.detach(), module.unet.conv_in.weight.grad.clone())
    torch.testing.assert_close(losses[True][0], losses[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[True][1], losses[False][1], rtol=1e-4, atol=1e-6)


# --- bf16 VAE encodes in fp32 runs ---------------------------------------------------------


def test_vae_bf16_encode_runs_the_encoder_in_bf16_and_keeps_fp32_moments_and_the_loss(
    monkeypatch, caplog
):
    from t2ilab import bench
    from t2ilab.modules import base
    from t2ilab.modules.step_random import StepRandom

    torch.manual_seed(0)
    module = bench.build_module(bench.build_components("tiny_sd"), "full")
    batch = bench.make_batch(module, 2, 64, torch.device("cpu"), cache=False)
    seen = []
    module.vae.encoder.conv_in.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    results = {}
    for flag in (False, True):
        module.vae_bf16_encode = flag
        posterior = module.vae_posterior(batch["pixel_values"])
        loss, _ = module.diffusion_loss(batch, StepRandom(0, (1,)))
        results[flag] = (posterior.mean, posterior.std, loss.detach())
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2
    (mean32, std32, loss32), (mean16, std16, loss16) = results[False], results[True]
    assert mean16.dtype == std16.dtype == torch.float32
    assert not torch.equal(mean16, mean32)  # the flag acts...
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(mean16, mean32) < 2e-2 and rel(std16, std32) < 2e-2  # ...within bf16's rounding
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=1e-4)

    monkeypatch.setattr(base, "cpu_has_bf16_units", lambda: False)
    with caplog.at_level("WARNING"):
        module.configure_model()
    assert "method.vae_bf16_encode=false" in caplog.text


def test_vae_bf16_encode_may_change_on_resume_and_older_checkpoints_trained_without_it():
    from t2ilab.resume import settings_changes

    assert settings_changes({}, {"method.vae_bf16_encode": False}, "last.ckpt") == {}
    changed = settings_changes(
        {"method.vae_bf16_encode": False}, {"method.vae_bf16_encode": True}, "last.ckpt"
    )
    assert changed == {"method.vae_bf16_encode": [False, True]}


def test_after_fit_the_optimizer_state_and_gradients_are_released():
    from t2ilab.build import release_training_state

    module = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    assert optimizer.state and module.weight.grad is not None
    trainer = type("T", (), {"optimizers": [optimizer]})()
    release_training_state(trainer, module)
    assert not optimizer.state and module.weight.grad is None and module.bias.grad is None


def test_busy_elsewhere_counts_a_busy_neighbour():
    """A process spinning on a core is one runnable task besides this one."""
    import multiprocessing

    if threads.busy_elsewhere() is None:
        pytest.skip("no /proc/loadavg here")
    before = threads.busy_elsewhere(samples=10)
    spinner = multiprocessing.Process(target=_spin, daemon=True)
    spinner.start()
    try:
        time.sleep(0.5)
        during = threads.busy_elsewhere(samples=10)
    finally:
        spinner.terminate()
    assert during >= before + 0.5


def _spin() -> None:
    while True:
        pass


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc")
def test_freed_tensor_memory_goes_back_to_the_os():
    """3000 tensors of 64 KiB (below glibc's mmap threshold, so on the heap), freed: their pages
    stay resident until return_freed_memory hands them back."""
    from t2ilab.build import return_freed_memory

    tensors = [torch.ones(16384) for _ in range(3000)]  # ~188 MiB
    del tensors[::2]  # interleaved survivors keep the heap's top in use
    del tensors[:-1]
    held = _rss_mib()
    return_freed_memory()
    assert _rss_mib() < held - 100


def test_a_resumed_run_keeps_the_checkpoints_thread_count(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_chosen", {})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        assert threads.apply_cpu_threads("auto", resumed=1) == 1
        monkeypatch.setattr(threads, "_chosen", {})
        assert threads.apply_cpu_threads(2, resumed=1) == 2  # an explicit count wins
    finally:
        torch.set_num_threads(before)
