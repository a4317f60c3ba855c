"""fastnca.kernels: the fused Triton NCA kernels and their plain-PyTorch reference.

Import as ``fastnca.kernels``. The reference (``reference.py``) needs only PyTorch; the Triton modules are
imported lazily so that the package works where Triton is not installed.
"""

from .reference import UpdateWeights, double_ref, make_update_mask, nca_step_ref, update_ref

__all__ = ["UpdateWeights", "double_ref", "make_update_mask", "nca_step_ref", "update_ref"]
