"""Compute kernels. `reference` holds the slow, obvious PyTorch versions every kernel is tested
against; Triton kernels (GPU) live beside it and are imported only when Triton is present."""
