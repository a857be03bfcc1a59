"""Triton kernels for the per-step work around the UNet, each beside its PyTorch reference.

Not named ``kernels``: that is a PyPI package transformers imports, which a folder of that name in a checkout
would shadow.
"""
