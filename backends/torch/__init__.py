"""PyTorch backend (CUDA, CPU)."""
