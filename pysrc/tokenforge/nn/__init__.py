"""Drop-in nn.Modules backed by tokenforge ops."""

from tokenforge.nn.add_rms_norm import AddRMSNorm
from tokenforge.nn.cross_entropy import CrossEntropyLoss, LinearCrossEntropyLoss
from tokenforge.nn.rms_norm import RMSNorm
from tokenforge.nn.rope import RotaryEmbedding
from tokenforge.nn.swiglu import SwiGLU

__all__ = ["AddRMSNorm", "CrossEntropyLoss", "LinearCrossEntropyLoss", "RMSNorm", "RotaryEmbedding", "SwiGLU"]
