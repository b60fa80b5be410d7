"""What `trainer.cpu_threads` gives on a CPU: the same short run with torch's default threads,
with `auto` and with one thread, alternating, optionally beside busy processes that stand in
for other jobs on a shared machine.

    python experiments/benchmarks/threads.py --busy 1 --rounds 3 --out threads.json

Each run is `train.py experiment=dreambooth model=tiny_sd` for --steps steps (no evaluation,
sample grid or export), timed by step_timer.py: steady s/step after the first 3 steps, and the
whole process's wall time. OMP_NUM_THREADS is removed from the runs' environment, so `auto`
decides.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from side_by_side import round_order, summarize_run  # noqa: E402

SETTINGS = {"default": "null", "auto": "auto", "one": "1"}


def busy_loop() -> None:  # a CPU-bound neighbour
    while True:
        pass


def run_once(setting: str, out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    command = [
        args.python, str(HERE / "step_timer.py"), "--out", str(out / "timings.json"), "--",
        str(ROOT / "train.py"), "experiment=dreambooth", "model=tiny_sd",
        f"trainer.max_steps={args.steps}", f"trainer.cpu_threads={SETTINGS[setting]}",
        "method.num_class_images=8", "eval=none", "logger=csv", "export.enabled=false",
        "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false",
        f"paths.class_images_dir={args.workdir}/class_images", f"hydra.run.dir={out / 'run'}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{setting} failed: see {out / 'log.txt'}")
    threads_line = [
        line for line in (out / "log.txt").read_text().splitlines() if "cpu threads:" in line
    ]
    timings = json.loads((out / "timings.json").read_text())
    row = {"setting": setting, **summarize_run(timings, wall, skip=3)}
    row["threads_line"] = threads_line[0].split("] - ")[-1] if threads_line else None
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--busy", type=int, default=0, help="busy processes beside the runs")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "threads_bench"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    neighbours = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.busy)]
    for p in neighbours:
        p.start()
    time.sleep(5 if neighbours else 0)  # let the load average see them
    rows = []
    try:
        run_once("one", Path(args.workdir) / "warmup", args)  # class images, caches of the OS
        for round_index in range(args.rounds):
            for setting in round_order(list(SETTINGS), round_index):
                out = Path(args.workdir) / f"{setting}_r{round_index}"
                row = run_once(setting, out, args)
                row["round"] = round_index
                rows.append(row)
                print(
                    f"round {round_index} {setting}: {row['s_per_step_median']:.3f} s/step, "
                    f"wall {row['wall_s']:.1f} s ({row['threads_line']})",
                    file=sys.stderr,
                )
    finally:
        for p in neighbours:
            p.terminate()
    print(f"busy neighbours: {args.busy}, cores: {os.cpu_count()}")
    print("| cpu_threads | s/step median (rounds) | wall s median | threads chosen |")
    print("| --- | --- | --- | --- |")
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        steps = ", ".join(f"{r['s_per_step_median']:.3f}" for r in mine)
        wall = statistics.median(r["wall_s"] for r in mine)
        print(f"| {SETTINGS[setting]} | {steps} | {wall:.1f} | {mine[0]['threads_line']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"busy": args.busy, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
