"""MLX backend (Apple Silicon; CPU on Linux for tests). `MLXBackend` is imported on first use,
so that light modules here import without mlx-lm."""

__all__ = ["MLXBackend"]


def __getattr__(name: str):
    if name == "MLXBackend":
        from pertoken.backends.mlx.backend import MLXBackend

        return MLXBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
