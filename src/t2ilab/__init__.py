"""t2ilab: Lightning + Hydra experiments for text-to-image diffusion fine-tuning and training."""

__version__ = "0.1.0"

# Registers the config resolvers (e.g. the run folder's name) before any Hydra config loads.
from t2ilab import launch as _launch  # noqa: E402, F401
