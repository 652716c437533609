"""Step-by-step Preference Optimization (SPO) for text-to-image diffusion models."""

__version__ = "0.1.0.dev0"
