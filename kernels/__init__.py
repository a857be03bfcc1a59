"""Triton kernels for the per-step work around the UNet, each beside its PyTorch reference.

Installed as ``fastcache_kernels`` (``kernels`` is taken on PyPI).
"""
