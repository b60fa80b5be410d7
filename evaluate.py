"""Evaluate with the DreamBooth protocol: `python evaluate.py run_dir=logs/train/runs/<ts>`.

Also `export_dir=<diffusers folder>`, or a base model: `model=sd15 data.instance_dir=~/dog`.
"""

import os
import sys
from pathlib import Path

import hydra

import t2ilab.quiet  # noqa: F401  (before transformers imports: silences known noise)

os.environ.setdefault("T2ILAB_ROOT", str(Path(__file__).resolve().parent))

from t2ilab.preflight import preflight  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg) -> None:
    from t2ilab.evaluate import run  # torch and diffusers load once the command line checks out

    run(cfg)


if __name__ == "__main__":
    # Typos and run-folder mistakes: one line, before Hydra writes anything.
    preflight(Path(__file__).resolve().parent / "conf", "evaluate", sys.argv[1:])
    main()
