"""PyTorch backend (CUDA, CPU)."""

from pertoken.backends.torch.backend import TorchBackend

__all__ = ["TorchBackend"]
