"""MLX backend (Apple Silicon; CPU on Linux for tests)."""
