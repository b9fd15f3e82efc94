"""Drop-in nn.Modules backed by tokenforge ops."""

from tokenforge.nn.add_rms_norm import AddRMSNorm
from tokenforge.nn.attention import Attention, MultiHeadAttention
from tokenforge.nn.cross_entropy import CrossEntropyLoss, LinearCrossEntropyLoss, VocabParallelLinearCrossEntropyLoss
from tokenforge.nn.moe import MoE
from tokenforge.nn.rms_norm import RMSNorm
from tokenforge.nn.rope import RotaryEmbedding
from tokenforge.nn.swiglu import SwiGLU

__all__ = ["AddRMSNorm", "Attention", "CrossEntropyLoss", "LinearCrossEntropyLoss", "MoE", "MultiHeadAttention", "RMSNorm", "RotaryEmbedding", "SwiGLU",
           "VocabParallelLinearCrossEntropyLoss"]
