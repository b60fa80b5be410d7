"""The analysis command lines on what users get wrong: one `t2ilab: error: <what>: <fix>` line on
stderr, exit code 2, no traceback, checked before any heavy work (noise_diff: before the
pipeline loads), and nothing the user made is overwritten."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from t2ilab.analysis import anova, collect, compare_grids

ROOT = Path(__file__).resolve().parents[1]
IN, OUT = "method.input_position", "method.output_position"


def run_cli(module: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"t2ilab.analysis.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=300,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("t2ilab: error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# ------------------------------------------------------------------------------ run folders


def write_run(root: Path, name: str, factors: dict, metrics: dict, status: str = "ok") -> Path:
    run = root / name
    run.mkdir(parents=True)
    results = {
        "experiment": "adapter",
        "status": status,
        "reason": None if status == "ok" else f"{status} on purpose",
        "factors": factors,
        "metrics": metrics,
        "steps": 10,
        "wall_time_s": 1.0,
    }
    (run / "results.json").write_text(json.dumps(results))
    return run


def sweep(root: Path) -> Path:
    """2 x 2 positions, 2 seeds, dino and clip_t; no sample grids."""
    cells = itertools.product(("SA_in", "CA_in"), ("FFN_in", "Trans_out"), (0, 1))
    for i, (inp, out, seed) in enumerate(cells):
        metrics = {"dino": 0.1 + 0.05 * (inp == "CA_in") + 0.01 * seed, "clip_t": 0.3}
        write_run(root, str(i), {IN: inp, OUT: out, "seed": seed}, metrics)
    return root


def empty(root: Path) -> Path:
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "notes.txt").write_text("no runs here\n")
    return root


def corrupt_only(root: Path) -> Path:
    run = write_run(root, "0", {IN: "SA_in"}, {"dino": 0.1})
    (run / "results.json").write_text('{"experiment": "adapter", "sta')  # killed mid-write
    return root


def one_level(root: Path) -> Path:
    for seed in range(3):
        write_run(root, str(seed), {IN: "SA_in", "seed": seed}, {"dino": 0.1 * seed})
    return root


def none_ok(root: Path) -> Path:
    write_run(root, "0", {IN: "SA_in"}, {}, status="failed")
    write_run(root, "1", {IN: "CA_in"}, {}, status="skipped")
    return root


def user_file(path: Path, text: str = "my own notes\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def user_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)  # a picture of the user's: no t2ilab mark
    return path


# A case: (module, build(tmp) -> (argv, files that must stay as they are), fragments of the
# one error line).
Case = tuple[str, Callable[[Path], tuple[list, list[Path]]], tuple[str, ...]]

ANOVA: dict[str, Case] = {
    "folder does not exist": (
        "anova",
        lambda t: ([t / "nope", "--metric", "dino"], []),
        ("nope does not exist", "point at a run folder or a multirun sweep folder"),
    ),
    "no results.json under the folder": (
        "anova",
        lambda t: ([empty(t / "s"), "--metric", "dino"], []),
        ("no results.json under", "point at"),
    ),
    "only corrupt results.json": (
        "anova",
        lambda t: ([corrupt_only(t / "s"), "--metric", "dino"], []),
        ("none of the 1 results.json", str(Path("s") / "0" / "results.json"), "not valid JSON"),
    ),
    "a metric no run has": (
        "anova",
        lambda t: ([sweep(t / "s"), "--metric", "fid"], []),
        ("--metric fid is missing in all 8 runs", "use one of dino, clip_t"),
    ),
    "a factor no run has": (
        "anova",
        lambda t: ([sweep(t / "s"), "--metric", "dino", "--factors", "method.lr"], []),
        ("--factors method.lr: no such factor", f"use one of {IN}, {OUT}, seed"),
    ),
    "a heatmap factor no run has": (
        "anova",
        lambda t: ([sweep(t / "s"), "--metric", "dino", "--heatmap", "method.lr", IN], []),
        ("--heatmap method.lr: no such factor", f"use one of {IN}"),
    ),
    "one level of every factor": (
        "anova",
        lambda t: ([one_level(t / "s"), "--metric", "dino"], []),
        ("the ANOVA cannot be fitted", "no factor has 2 or more levels"),
    ),
    "every run failed or was skipped": (
        "anova",
        lambda t: ([none_ok(t / "s"), "--metric", "dino"], []),
        ("no ok run to analyse", "1 failed, 1 skipped", "reason"),
    ),
    "--out is a file": (
        "anova",
        lambda t: (
            [sweep(t / "s"), "--metric", "dino", "--out", user_file(t / "report.txt")],
            [t / "report.txt"],
        ),
        ("is a file: pass a folder",),
    ),
    "the user's own anova.md in the report folder": (
        "anova",
        lambda t: (
            [sweep(t / "s"), "--metric", "dino", "--out", t / "mine"],
            [user_file(t / "mine" / "anova.md")],
        ),
        ("anova.md exists and was not written by this tool", "choose another --out"),
    ),
    "the user's own heatmap.png in the sweep folder": (
        "anova",
        lambda t: ([sweep(t / "s"), "--metric", "dino"], [user_png(t / "s" / "heatmap.png")]),
        ("heatmap.png exists and was not written by this tool",),
    ),
    "no --metric": (
        "anova",
        lambda t: ([sweep(t / "s")], []),
        ("--metric", "--help"),
    ),
}

COLLECT: dict[str, Case] = {
    "folder does not exist": ("collect", lambda t: ([t / "nope"], []), ("does not exist",)),
    "no results.json under the folder": (
        "collect",
        lambda t: ([empty(t / "s")], []),
        ("no results.json under",),
    ),
    "only corrupt results.json": (
        "collect",
        lambda t: ([corrupt_only(t / "s")], []),
        ("none of the 1 results.json", str(Path("s") / "0" / "results.json")),
    ),
    "a --group-by factor no run has": (
        "collect",
        lambda t: ([sweep(t / "s"), "--group-by", "method.lr"], []),
        ("--group-by method.lr", f"use one of experiment, {IN}, {OUT}, seed"),
    ),
    "the user's own results.csv in the sweep folder": (
        "collect",
        lambda t: ([sweep(t / "s")], [user_file(t / "s" / "results.csv", "a,b\n1,2\n")]),
        ("results.csv exists and was not written by this tool", "--out"),
    ),
    "--out onto a run's results.json": (
        "collect",
        lambda t: (
            [sweep(t / "s"), "--out", t / "s" / "0" / "results.json"],
            [t / "s" / "0" / "results.json"],
        ),
        ("results.json exists and was not written by this tool",),
    ),
    "--markdown onto the user's README.md": (
        "collect",
        lambda t: ([sweep(t / "s"), "--markdown", user_file(t / "README.md")], [t / "README.md"]),
        ("README.md exists and was not written by this tool", "--markdown"),
    ),
    "--out is a folder": (
        "collect",
        lambda t: ([sweep(t / "s"), "--out", t], []),
        ("is a folder: pass a file path",),
    ),
}

COMPARE_GRIDS: dict[str, Case] = {
    "folder does not exist": (
        "compare_grids",
        lambda t: ([t / "nope", "--out", t / "g.png"], []),
        ("does not exist",),
    ),
    "no results.json under the folder": (
        "compare_grids",
        lambda t: ([empty(t / "s"), "--out", t / "g.png"], []),
        ("no results.json under",),
    ),
    "only corrupt results.json": (
        "compare_grids",
        lambda t: ([corrupt_only(t / "s"), "--out", t / "g.png"], []),
        ("none of the 1 results.json",),
    ),
    "runs without sample grids": (
        "compare_grids",
        lambda t: ([sweep(t / "s"), "--out", t / "g.png"], []),
        ("no run under", "samples/step_*.png", "8 ok", "keep callbacks.samples on"),
    ),
    "--where without =": (
        "compare_grids",
        lambda t: ([sweep(t / "s"), "--where", "seed", "--out", t / "g.png"], []),
        ("--where seed: expected KEY=VALUE",),
    ),
    "--where with a factor no run has": (
        "compare_grids",
        lambda t: ([sweep(t / "s"), "--where", "lr=1", "--out", t / "g.png"], []),
        ("--where lr=1: no factor lr", f"use one of {IN}, {OUT}, seed"),
    ),
    "--where with a value no run has": (
        "compare_grids",
        lambda t: ([sweep(t / "s"), "--where", "seed=7", "--out", t / "g.png"], []),
        ("--where seed=7: no run has this value", "use one of 0, 1"),
    ),
    "--out onto the user's picture": (
        "compare_grids",
        lambda t: ([sweep(t / "s"), "--out", t / "me.png"], [user_png(t / "me.png")]),
        ("me.png exists and was not written by this tool",),
    ),
    "--out that is not a png": (
        "compare_grids",
        lambda t: ([sweep(t / "s"), "--out", t / "g.jpg"], []),
        ("give a path ending in .png",),
    ),
}


def pipeline_json_only(folder: Path, index: dict | None = None) -> Path:
    """A pipeline folder with the JSON files of Stable Diffusion and no weights at all: it
    passes every check, and loading it would fail, so an error about anything else proves the
    check came first."""
    folder.mkdir(parents=True)
    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    index = index or {
        "_class_name": "StableDiffusionPipeline",
        **{c: ["x", "y"] for c in components},
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    return folder


def images(folder: Path, n: int = 1) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16), "blue").save(folder / f"{i}.png")
    return folder


def noise_diff_args(pipeline: Path, image_dir: Path, *extra, prompt_b="a photo of dog") -> list:
    prompts = ["--prompt-a", "a photo of sks dog", "--prompt-b", prompt_b]
    return ["--pipeline", pipeline, "--images", image_dir, *prompts, *extra]


PIXART_INDEX = {"_class_name": "PixArtAlphaPipeline", "transformer": [], "vae": [], "scheduler": []}

NOISE_DIFF: dict[str, Case] = {
    "pipeline folder does not exist": (
        "noise_diff",
        lambda t: (noise_diff_args(t / "nope", images(t / "i")), []),
        ("--pipeline", "does not exist", "export/"),
    ),
    "pipeline folder that is not a diffusers folder": (
        "noise_diff",
        lambda t: (noise_diff_args(empty(t / "p"), images(t / "i")), []),
        ("is not a diffusers pipeline folder (no model_index.json)", "export/"),
    ),
    "a pipeline without a UNet": (
        "noise_diff",
        lambda t: (noise_diff_args(pipeline_json_only(t / "p", PIXART_INDEX), images(t / "i")), []),
        ("is a PixArtAlphaPipeline without unet", "Stable Diffusion pipeline"),
    ),
    "images folder with no images": (
        "noise_diff",
        lambda t: (noise_diff_args(pipeline_json_only(t / "p"), empty(t / "i")), []),
        ("--images", "has no images"),
    ),
    "the same prompt twice": (
        "noise_diff",
        lambda t: (
            noise_diff_args(
                pipeline_json_only(t / "p"), images(t / "i"), prompt_b="a photo of sks dog"
            ),
            [],
        ),
        ("--prompt-a and --prompt-b are the same",),
    ),
    "a timestep the model does not have": (
        "noise_diff",
        lambda t: (
            noise_diff_args(pipeline_json_only(t / "p"), images(t / "i"), "--timesteps", "5000"),
            [],
        ),
        ("timestep 5000 is outside the model's 0..999",),
    ),
    "--out onto the user's picture": (
        "noise_diff",
        lambda t: (
            noise_diff_args(pipeline_json_only(t / "p"), images(t / "i"), "--out", t / "me.png"),
            [user_png(t / "me.png")],
        ),
        ("me.png exists and was not written by this tool",),
    ),
}

CASES = {
    f"{module} {name}": case
    for module, cases in [
        ("anova", ANOVA),
        ("collect", COLLECT),
        ("compare_grids", COMPARE_GRIDS),
        ("noise_diff", NOISE_DIFF),
    ]
    for name, case in cases.items()
}


# The first case of each tool runs as `python -m`, as users run it; the others call the same
# main() in this process (the one-line handling is main()'s own), 3 s less each.
AS_A_COMMAND = {
    next(name for name in CASES if name.startswith(f"{m} "))
    for m in ("anova", "collect", "compare_grids", "noise_diff")
}


def run_in_process(module: str, *args: str | Path, cwd: Path, capsys, monkeypatch):
    import importlib

    monkeypatch.chdir(cwd)
    main = importlib.import_module(f"t2ilab.analysis.{module}").main
    capsys.readouterr()
    try:
        code = main(list(map(str, args)))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    module, build, fragments = CASES[case]
    argv, kept = build(tmp_path)
    before = {path: path.read_bytes() for path in kept}
    if case in AS_A_COMMAND:
        proc = run_cli(module, *argv, cwd=tmp_path)
    else:
        proc = run_in_process(module, *argv, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_user_error(proc, *fragments)
    assert proc.stdout == ""  # nothing half done
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} was overwritten"


# ---------------------------------------------------------------------- what is not an error


def test_a_corrupt_run_among_good_ones_is_skipped_with_a_warning(tmp_path, capsys):
    root = sweep(tmp_path / "s")
    (root / "3" / "results.json").write_text("")  # an empty file: the run died mid-write
    for main, argv in [(collect.main, []), (anova.main, ["--metric", "dino", "--no-plots"])]:
        assert main([str(root), *argv]) == 0
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("t2ilab: ")]
        assert len(lines) == 1 and lines[0].startswith("t2ilab: warning: skipping "), err
        assert str(Path("3") / "results.json") in lines[0]


def test_collect_of_failed_runs_shows_their_reasons(tmp_path, capsys):
    """collect is where a user reads why runs failed, so a sweep without an ok run is still
    tabled (exit 0), with a warning that there is nothing to compare."""
    root = none_ok(tmp_path / "s")
    assert collect.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert "t2ilab: warning: no run is ok (2 runs: 0 ok, 1 failed, 1 skipped)" in err
    assert "failed on purpose" in out and (root / "results.csv").is_file()


def test_a_rerun_replaces_only_what_the_tools_wrote(tmp_path, capsys):
    """The tools recognise their own files: running twice works; a file of the user's in the
    same place is refused and left as it was."""
    root = sweep(tmp_path / "s")
    for step, run in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        (run / "samples").mkdir()
        Image.new("RGB", (16, 8), (30 * step, 0, 0)).save(run / "samples" / "step_000010.png")
    grid = tmp_path / "grid.png"
    commands = [
        (collect.main, [root, "--group-by", IN], root / "results.md"),
        (anova.main, [root, "--metric", "dino"], root / "heatmap.png"),
        (compare_grids.main, [root, "--out", grid], grid),
    ]
    for _ in range(2):
        for main, argv, _ in commands:
            assert main([str(a) for a in argv]) == 0
    assert (root / "heatmap.png").is_file() and (root / "results.md").is_file()
    capsys.readouterr()

    for main, argv, path in commands:
        path.unlink(missing_ok=True)
        user_png(path) if path.suffix == ".png" else user_file(path)
        before = path.read_bytes()
        assert main([str(a) for a in argv]) == 2
        assert "exists and was not written by this tool" in capsys.readouterr().err
        assert path.read_bytes() == before
