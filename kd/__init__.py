"""kdflow: knowledge distillation of PyTorch teachers into small students."""

__version__ = "0.1.0"
