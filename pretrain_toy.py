"""Pretrain a toy-world model: `python pretrain_toy.py toy_component=vae|clip|dino`.

The recipes are conf/toy_component/*.yaml; the shipped folders are models/toy/toy_*/.
"""

import os
from pathlib import Path

import hydra

# Set before the configs load, so paths.root_dir is the repository from any cwd.
os.environ.setdefault("T2ILAB_ROOT", str(Path(__file__).resolve().parent))
# Set before torch loads: OpenMP threads that spin while waiting make a CPU shared with another
# job ~10x slower (measured: 0.3 s -> 3.5 s a CLIP step); sleeping ones cost ~nothing alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from t2ilab.toy.pretrain import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain_toy")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
