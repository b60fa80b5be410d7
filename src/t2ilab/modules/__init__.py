"""LightningModules: one base with the shared diffusion step, small subclasses per method."""
