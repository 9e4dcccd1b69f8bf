"""lgframe: constraint-based pre-training and learngene transfer on PyTorch Lightning."""

__version__ = "0.1.0"
