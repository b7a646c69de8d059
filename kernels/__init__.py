"""Triton kernels and their plain-PyTorch references (installed as hybridize.kernels)."""
