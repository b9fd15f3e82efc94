"""Drop-in nn.Modules backed by tokenforge ops."""

from tokenforge.nn.rms_norm import RMSNorm

__all__ = ["RMSNorm"]
