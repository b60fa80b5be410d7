"""Train an experiment: `python train.py experiment=dreambooth_sigmoid [key=value ...]`.

Everything a user turns is a key under conf/; `python train.py --help` lists the groups.
"""

import os
import sys
from pathlib import Path

import hydra

# Set before the configs load, so paths.root_dir finds the bundled data from any cwd.
os.environ.setdefault("T2ILAB_ROOT", str(Path(__file__).resolve().parent))

from t2ilab.preflight import preflight  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg) -> None:
    from t2ilab.train import run  # torch and diffusers load once the command line checks out

    run(cfg)


if __name__ == "__main__":
    # Typos and run-folder mistakes: one line, before Hydra writes anything.
    preflight(Path(__file__).resolve().parent / "conf", "train", sys.argv[1:])
    main()
