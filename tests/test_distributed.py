"""Multi-process training: DDP on 2 CPU processes (gloo) matches one process with the doubled
batch; ranks share one run folder; class images are split across ranks without duplicates."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from _support import CONF, run_train
from omegaconf import OmegaConf
from safetensors.torch import load_file

from t2ilab.data.class_images import generate_class_images
from t2ilab.launch import external_rank, run_stamp
from t2ilab.models.loading import load_sd_components
from t2ilab.modules.step_random import StepRandom, grouped

# --- the step's random draws -------------------------------------------------------------------


def test_ranks_draw_their_slice_of_the_global_batch():
    single = StepRandom(seed=5, key=(3, 0, 0), rank=0, world_size=1)
    whole = single.randn("noise", (4, 2, 3, 3))
    parts = [
        StepRandom(5, (3, 0, 0), rank=r, world_size=2).randn("noise", (2, 2, 3, 3)) for r in (0, 1)
    ]
    assert torch.equal(torch.cat(parts), whole)
    steps = [single.randint("t", (4,), high=1000)]
    steps += [StepRandom(5, (3, 0, 0), r, 2).randint("t", (2,), high=1000) for r in (0, 1)]
    assert torch.equal(torch.cat(steps[1:]), steps[0])
    # Another step, stream or seed: other values; rank 0 and rank 1 never share noise.
    assert not torch.equal(StepRandom(5, (4, 0, 0)).randn("noise", (4, 2, 3, 3)), whole)
    assert not torch.equal(single.randn("offset", (4, 2, 3, 3)), whole)
    assert not torch.equal(parts[0], parts[1])


def test_prior_preservation_groups_match_the_single_process_batch():
    """Rank r holds [instance_r, class_r]; one process holds [instances..., classes...]."""
    one = StepRandom(1, (0,), 0, 1)
    whole = grouped(one.randn, "noise", (4, 3), num_first=2)
    ranks = [grouped(StepRandom(1, (0,), r, 2).randn, "noise", (2, 3), num_first=1) for r in (0, 1)]
    assert torch.equal(torch.stack([ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]]), whole)


# --- one run folder for ranks started by torchrun / srun ---------------------------------------

LAUNCH_VARS = (
    "TORCHELASTIC_RUN_ID",
    "RANK",
    "WORLD_SIZE",
    "MASTER_PORT",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
)


@pytest.fixture
def clean_launch_env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_ranks_of_one_launch_agree_on_the_run_folder(clean_launch_env):
    env = clean_launch_env
    assert external_rank() == (0, 1)
    alone = run_stamp()
    assert alone[:4].isdigit() and alone != run_stamp()  # a timestamp, new per run
    env.setenv("TORCHELASTIC_RUN_ID", "5f2c")
    env.setenv("WORLD_SIZE", "4")
    names = set()
    for rank in range(4):
        env.setenv("RANK", str(rank))
        assert external_rank() == (rank, 4)
        names.add(run_stamp())
    assert names == {"torchrun-5f2c"}
    for var in LAUNCH_VARS:
        env.delenv(var, raising=False)
    env.setenv("SLURM_NTASKS", "8")
    env.setenv("SLURM_JOB_ID", "4711")
    env.setenv("SLURM_STEP_ID", "0")
    stamps = set()
    for rank in range(8):
        env.setenv("SLURM_PROCID", str(rank))
        assert external_rank() == (rank, 8)
        stamps.add(run_stamp())
    assert stamps == {"slurm-4711.0"}
    env.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job is an ordinary run
    assert external_rank() == (0, 1) and run_stamp()[:4].isdigit()


def test_hydra_run_dir_uses_the_launch_name(clean_launch_env, tmp_path):
    """What train.py would resolve hydra.run.dir to on rank 3 of a torchrun launch."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    clean_launch_env.setenv("TORCHELASTIC_RUN_ID", "abc")
    clean_launch_env.setenv("RANK", "3")
    clean_launch_env.setenv("WORLD_SIZE", "4")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[f"paths.log_dir={tmp_path}"])
    OmegaConf.clear_cache(cfg)
    assert cfg.hydra.run.dir == f"{tmp_path}/train/runs/torchrun-abc"


# --- class images split across ranks -----------------------------------------------------------


class CountingPipeline:
    """Stands in for a diffusers pipeline: one solid image per seed, and a log of the calls."""

    def __init__(self):
        self.seeds: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, prompt, generator, **kwargs):
        from PIL import Image

        seeds = [g.initial_seed() for g in generator]
        with self.lock:
            self.seeds += seeds

        class Out:
            images = [Image.new("RGB", (8, 8), (s % 256, 0, 0)) for s in seeds]

        return Out()


def test_class_images_are_split_across_ranks_without_duplicates(tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    (class_dir / "mine.png").write_bytes(
        (Path(CONF).parent / "data/example_subject/subject_00.png").read_bytes()
    )
    pipes = [CountingPipeline() for _ in range(3)]
    made = [0, 0, 0]

    def rank_main(rank):
        made[rank] = generate_class_images(
            pipes[rank],
            "a dog",
            class_dir,
            num_images=11,
            batch_size=2,
            seed=100,
            rank=rank,
            world_size=3,
            wait_timeout_s=60,
        )

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seeds = [s for p in pipes for s in p.seeds]
    assert sorted(seeds) == list(range(100, 110))  # 10 missing images, each made once
    assert made == [4, 3, 3]
    for rank, pipe in enumerate(pipes):
        assert all((s - 100) % 3 == rank for s in pipe.seeds)
    names = sorted(p.name for p in class_dir.iterdir())
    assert names == [f"class_{i:05d}.png" for i in range(10)] + ["mine.png"]
    assert not list(class_dir.glob(".*"))  # no temp files left


def test_a_rank_waiting_for_a_missing_share_fails_clearly(tmp_path):
    from t2ilab.errors import UserError

    with pytest.raises(UserError, match="never appeared.*class_00001"):
        generate_class_images(
            CountingPipeline(),
            "a dog",
            tmp_path / "c",
            num_images=2,
            rank=0,
            world_size=2,
            wait_timeout_s=0.5,
        )


# --- DDP on two CPU processes ------------------------------------------------------------------

# One SGD step (update proportional to the gradient, unlike Adam's sign-like first step), no
# clipping, no shuffling: rank r trains on subject image r, a single process on images 0 and 1.
DDP_ARGS = [
    "experiment=dreambooth_sigmoid",
    "model=tiny_sd",  # compared with the tiny base built from its config below
    "trainer.max_steps=1",
    "method.prior_preservation=false",
    "data.shuffle=false",
    "eval=none",
    "logger=csv",
    "callbacks.samples.at_end=false",
    "callbacks.samples.every_n_steps=0",
    "~method.module.optimizer.betas",
    "~method.module.optimizer.eps",
    "method.module.optimizer._target_=torch.optim.SGD",
    "method.module.optimizer.weight_decay=0",
    "method.lr=10",
    "trainer.gradient_clip_val=null",
]


def _unet_update(run_dir: Path, base: dict[str, torch.Tensor]) -> torch.Tensor:
    trained = load_file(run_dir / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    return torch.cat([(trained[k] - base[k]).flatten() for k in sorted(base)])


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process_with_the_doubled_batch(tmp_path):
    runs = {
        "ddp": [
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "data.batch_size=1",
        ],
        "single": ["data.batch_size=2"],
        "first_image_only": ["data.batch_size=1"],
    }
    for name, extra in runs.items():
        proc = run_train([*DDP_ARGS, *extra], tmp_path / name, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = tmp_path / "ddp"
    # One run folder: one export, one results.json (rank 0), both ranks' logs side by side.
    assert json.loads((ddp / "results.json").read_text())["status"] == "ok"
    assert {p.name for p in ddp.glob("*.log")} == {"train.log", "train_ddp_process_1.log"}
    assert not list(tmp_path.glob("ddp*/**/export/export"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "first_image_only", "single"]

    base_unet = load_sd_components(OmegaConf.load(CONF / "model" / "tiny_sd.yaml")).unet
    base = {k: v.detach() for k, v in base_unet.state_dict().items()}
    updates = {name: _unet_update(tmp_path / name, base) for name in runs}
    assert updates["ddp"].abs().max() > 1e-3  # the step did change the weights
    torch.testing.assert_close(updates["ddp"], updates["single"], rtol=1e-3, atol=1e-6)
    # The check can fail: a batch of image 0 alone gives a clearly different update.
    gap = (updates["first_image_only"] - updates["single"]).norm() / updates["single"].norm()
    assert gap > 0.1


def test_single_job_argv_keeps_the_config_and_this_jobs_overrides():
    from t2ilab.launch import single_job_argv

    argv = [
        "train.py",
        "-m",
        "--config-dir",
        "sweeps",
        "--config-name=adapter_positions",
        "seed=0,1",
        "hydra.sweep.dir=/x",
        "trainer=ddp",
    ]
    assert single_job_argv(argv, ["seed=1", "trainer=ddp"]) == [
        "train.py",
        "--config-dir",
        "sweeps",
        "--config-name=adapter_positions",
        "seed=1",
        "trainer=ddp",
    ]


@pytest.mark.slow
def test_a_multirun_of_ddp_jobs_trains_each_job_once_in_its_own_folder(tmp_path):
    """Lightning's launcher re-runs the command for rank 1: without pinning it to the job, rank
    1 would run the whole sweep; without clearing LOCAL_RANK, job 2 would wait forever."""
    import os
    import subprocess
    import sys

    from _support import ROOT

    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *DDP_ARGS,
        "export.enabled=false",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for seed, job in enumerate(jobs):
        result = json.loads((job / "results.json").read_text())
        assert result["status"] == "ok" and result["steps"] == 1
        assert result["factors"]["seed"] == seed
        assert (job / "train_ddp_process_1.log").is_file()  # rank 1 trained this job, here
