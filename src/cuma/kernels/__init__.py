"""Optional Triton kernels of the routed layers' fast path (``fast_path="triton"``, see :mod:`cuma.tuners.fused`).

Nothing here is imported by ``import cuma``; Triton is only needed when a layer with ``fast_path="triton"`` runs on a
CUDA device, or under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, which the tests use).
"""
