"""Functional ops, one file each: validation, backend choice, autograd Function, custom ops."""

from tokenforge.ops.rms_norm import rms_norm, rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]
