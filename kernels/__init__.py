"""Triton kernels for the hot operations, each beside its PyTorch reference.

Every op module `surgery.kernels.<op>` exposes `<op>_reference` (plain PyTorch,
fp32 math, the source of truth) and `<op>`, which dispatches to Triton for CUDA
tensors and to the reference for CPU tensors. Set `SURGERY_FORCE_TRITON=1`
together with `TRITON_INTERPRET=1` to run the Triton code on CPU (tests do).
This package imports nothing else from the project.
"""
