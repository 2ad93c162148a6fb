"""dmlkit: deep metric learning for image retrieval on PyTorch."""

__version__ = "0.1.0"
