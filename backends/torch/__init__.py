"""PyTorch backend (CUDA, CPU). `TorchBackend` is imported on first use, so that light
modules here (load's device and dtype choice) import without torch and transformers."""

__all__ = ["TorchBackend"]


def __getattr__(name: str):
    if name == "TorchBackend":
        from pertoken.backends.torch.backend import TorchBackend

        return TorchBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
