"""Evaluate with the DreamBooth protocol: `python evaluate.py run_dir=logs/train/runs/<ts>`.

Also `export_dir=<diffusers folder>`, or a base model: `model=sd15 data.instance_dir=~/dog`.
"""

import os
from pathlib import Path

import hydra

os.environ.setdefault("T2ILAB_ROOT", str(Path(__file__).resolve().parent))

from t2ilab.evaluate import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
