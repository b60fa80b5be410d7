"""The side-by-side benchmark against diffusers' DreamBooth scripts (experiments/benchmarks):
the step clock, the steady-state and ratio arithmetic, the alternation of arms, and the t2ilab
and bare-loop arms end to end on a tiny model. diffusers' scripts are not part of the project
(they need torchvision), so their arm's command line is checked, not run."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _support import ROOT

BENCH = ROOT / "experiments" / "benchmarks"
sys.path.insert(0, str(BENCH))

import side_by_side  # noqa: E402


def _run_timer(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess, dict]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    out = tmp_path / "timings.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "step_timer.py"), "--out", str(out), "--", str(script), "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, json.loads(out.read_text())


def test_the_step_timer_stamps_every_optimizer_step_of_an_unmodified_script(tmp_path):
    done, timings = _run_timer(
        tmp_path,
        """
        import sys, time, torch
        assert sys.argv[1:] == ["x"]  # the script sees its own arguments
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([w], lr=0.1)
        for _ in range(7):
            time.sleep(0.05)
            w.sum().backward()
            opt.step()
            opt.zero_grad()
        """,
    )
    assert done.returncode == 0, done.stderr
    stamps = timings["step_end_s"]
    assert len(stamps) == 7 and timings["exit_code"] == 0
    intervals = side_by_side.steady_step_times(stamps, skip=0)
    assert len(intervals) == 6 and min(intervals) >= 0.05
    assert timings["peak_rss_mib"] >= max(timings["peak_rss_mib_at_step"]) > 0


def test_the_step_timer_keeps_the_scripts_exit_code(tmp_path):
    done, timings = _run_timer(tmp_path, "import sys\nsys.exit(3)\n")
    assert done.returncode == 3 and timings["exit_code"] == 3 and timings["step_end_s"] == []


def test_steady_state_leaves_out_the_first_steps():
    stamps = [10.0, 10.5, 11.5, 11.7, 11.9, 12.2]  # intervals 0.5, 1.0, 0.2, 0.2, 0.3
    assert side_by_side.steady_step_times(stamps, skip=2) == pytest.approx([0.2, 0.2, 0.3])
    run = side_by_side.summarize_run(
        {
            "script": "s",
            "step_end_s": stamps,
            "peak_rss_mib_at_step": [5, 6, 7, 8, 9, 10],
            "peak_rss_mib": 12.0,
            "cuda_max_memory_allocated_mib": None,
        },
        wall_s=20.0,
        skip=2,
    )
    assert run["s_per_step_median"] == pytest.approx(0.2)
    assert run["s_per_step_min"] == pytest.approx(0.2)
    assert run["peak_rss_mib_training"] == 10 and run["peak_rss_mib"] == 12.0
    with pytest.raises(SystemExit, match="fewer than"):
        side_by_side.summarize_run({"script": "s", "step_end_s": [1.0, 2.0]}, 1.0, skip=2)


def test_ratios_pair_the_arms_of_one_round():
    def run(arm, rnd, step, rss):
        return {"arm": arm, "round": rnd, "s_per_step_median": step, "s_per_step_min": step,
                "wall_s": 10.0, "peak_rss_mib": rss, "peak_rss_mib_training": rss}  # fmt: skip

    runs = [
        run("diffusers_full", 0, 1.0, 100),
        run("t2ilab_full", 0, 0.8, 90),
        run("floor_full", 0, 0.75, 80),
        run("diffusers_full", 1, 2.0, 100),  # a loaded round: both arms slow
        run("t2ilab_full", 1, 1.5, 90),
    ]
    ratios = side_by_side.paired_ratios(runs)
    assert [r["round"] for r in ratios] == [0, 1]
    assert ratios[0]["s_per_step_median/diffusers"] == pytest.approx(0.8)
    assert ratios[1]["s_per_step_median/diffusers"] == pytest.approx(0.75)
    assert ratios[0]["s_per_step_median/floor"] == pytest.approx(0.8 / 0.75)
    assert "s_per_step_median/floor" not in ratios[1]
    assert ratios[0]["peak_rss_mib/diffusers"] == pytest.approx(0.9)
    table = side_by_side.summary(runs, ratios)
    median = statistics.median([0.8, 0.75])
    assert f"| full | s_per_step_median/diffusers | {median:.3f} | 0.750-0.800 |" in table


def test_each_round_rotates_the_arms():
    arms = ["a", "b", "c"]
    orders = [side_by_side.round_order(arms, i) for i in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert {order[0] for order in orders} == set(arms)


def test_the_diffusers_arms_need_the_scripts(tmp_path, capsys):
    with pytest.raises(SystemExit):
        side_by_side.parse_args(["--arms", "diffusers_full"])
    assert "--diffusers-examples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        side_by_side.parse_args(["--arms", "diffusers_lora", "--diffusers-examples", str(tmp_path)])
    assert "train_dreambooth_lora.py not found" in capsys.readouterr().err


def test_both_tools_get_the_same_settings(tmp_path):
    (tmp_path / "train_dreambooth.py").write_text("")
    args = side_by_side.parse_args(
        ["--arms", "diffusers_full", "t2ilab_full", "--diffusers-examples", str(tmp_path)]
    )
    inputs = {"model": tmp_path / "m", "instance": tmp_path / "i", "class": tmp_path / "c"}
    peer = side_by_side.diffusers_command("full", inputs, tmp_path / "out", args)
    ours = side_by_side.t2ilab_overrides("full", inputs, tmp_path / "out", args)
    assert "--train_batch_size=2" in peer and "data.batch_size=2" in ours
    assert "--learning_rate=5e-06" in peer and "method.lr=5e-06" in ours
    assert "--resolution=128" in peer and "model.resolution=128" in ours
    assert "--num_class_images=100" in peer and "method.num_class_images=100" in ours
    assert (
        f"--class_data_dir={inputs['class']}" in peer
        and f"data.class_dir={inputs['class']}" in ours
    )
    assert "--with_prior_preservation" in peer and "experiment=dreambooth" in ours


@pytest.mark.slow
def test_the_t2ilab_and_floor_arms_run_side_by_side(tmp_path):
    from diffusers import DDPMScheduler
    from omegaconf import OmegaConf

    from t2ilab.models.loading import build_tiny_sd

    tiny = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/tiny_sd.yaml").tiny)
    model = tmp_path / "tiny_model"
    build_tiny_sd(tiny).save_pipeline(model, DDPMScheduler(**tiny["scheduler"]))
    out = tmp_path / "result.json"
    cmd = [
        sys.executable, str(BENCH / "side_by_side.py"), "--arms", "t2ilab_lora", "floor_lora",
        "--rounds", "1", "--steps", "8", "--skip", "2", "--resolution", "64",
        "--num-class-images", "4", "--model-dir", str(model), "--workdir", str(tmp_path / "w"),
        "--threads", "1", "--out", str(out), "--t2ilab-extra", "logger=csv",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["arm"] for r in result["runs"]] == ["t2ilab_lora", "floor_lora"]
    for run in result["runs"]:
        assert run["steps"] == 8 and run["s_per_step_median"] > 0 and run["peak_rss_mib"] > 0
    assert result["ratios"][0]["s_per_step_median/floor"] > 0
    assert "| t2ilab_lora | 1 |" in done.stdout
    # t2ilab's arm is a real run: its export holds the LoRA weights
    run_dir = tmp_path / "w" / "runs" / "t2ilab_lora_r0" / "run"
    assert (run_dir / "export" / "pytorch_lora_weights.safetensors").is_file()
