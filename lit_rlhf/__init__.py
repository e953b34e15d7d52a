"""lit_rlhf: PyTorch Lightning modules for RLHF of causal language models."""

__version__ = "0.1.0"
