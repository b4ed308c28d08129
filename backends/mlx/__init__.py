"""MLX backend (Apple Silicon; CPU on Linux for tests)."""

from pertoken.backends.mlx.backend import MLXBackend

__all__ = ["MLXBackend"]
