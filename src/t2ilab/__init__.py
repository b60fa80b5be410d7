"""t2ilab: Lightning + Hydra experiments for text-to-image diffusion fine-tuning and training."""

__version__ = "0.1.0"
