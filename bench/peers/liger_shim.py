"""pytest plugin: Liger-Kernel's own tests run against tokenforge's ops.

Liger's modules and functionals call ``liger_kernel.ops.Liger*Function.apply``. This plugin replaces
those classes, before Liger's tests import them, with adapters that take Liger's arguments and call
``tokenforge.ops``. Liger's references (Hugging Face modules, plain torch) stay as they are, so
every check in their suite compares our kernels with their reference at their tolerances.

Every argument of the replaced Functions maps onto one of ours (Liger's ``in_place`` / ``row_mode``
/ ``accum_dtype`` choose its kernel variant, not the math, and are dropped); nothing is computed in
torch here, so a test passes only on our kernels. Loaded by bench/peers/run_peer_tests.sh with
``-p liger_shim`` (after ``-p liger_on_cpu``; PEER_BASELINE=1 leaves this plugin out, so Liger's own
kernels run the same tests on the same machine: a failure both share is the machine's or the test's).
"""
import torch

import liger_kernel.ops as liger_ops
from tokenforge import ops


def _loss_outputs(result):
    """Liger's CE/FLCE Functions return (loss, z_loss, token_accuracy, predicted_tokens): our
    CrossEntropyOutput's fields, in that order."""
    if isinstance(result, torch.Tensor):
        return result, None, None, None
    return tuple(result)


class RMSNorm:
    @staticmethod
    def apply(X, W, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None):
        # in_place / row_mode choose Liger's kernel variant, not the math.
        return ops.rms_norm(X, W, eps, offset=offset, casting_mode=casting_mode)


class FusedAddRMSNorm:
    @staticmethod
    def apply(X, R, W, eps, offset=0.0, casting_mode="llama", in_place=True):
        return ops.add_rms_norm(X, R, W, eps, offset=offset, casting_mode=casting_mode)


class CrossEntropy:
    @staticmethod
    def apply(logits, target, weight=None, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
              reduction="mean", softcap=None, return_z_loss=False, return_token_accuracy=False,
              return_predicted_tokens=False):
        result = ops.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=label_smoothing, z_loss=lse_square_scale,
                                   softcap=softcap or 0.0, return_z_loss=return_z_loss,
                                   return_token_accuracy=return_token_accuracy,
                                   return_predicted_tokens=return_predicted_tokens)
        return _loss_outputs(result)


class FusedLinearCrossEntropy:
    @staticmethod
    def apply(hidden, lm_weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
              label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None,
              use_token_scaling=False, return_token_accuracy=False, return_predicted_tokens=False):
        # accum_dtype is Liger's choice of gradient accumulator; ours is always fp32.
        result = ops.linear_cross_entropy(hidden, lm_weight, target, bias, ignore_index=ignore_index,
                                          reduction=reduction, label_smoothing=label_smoothing,
                                          z_loss=lse_square_scale, softcap=softcap or 0.0, class_weight=ce_weight,
                                          return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                                          return_predicted_tokens=return_predicted_tokens,
                                          token_scaling=use_token_scaling)
        return _loss_outputs(result)


class SiLUMul:
    @staticmethod
    def apply(gate, up, gate_multiplier=1.0, down_multiplier=1.0):
        return ops.swiglu(gate, up, gate_multiplier=gate_multiplier, down_multiplier=down_multiplier)


class GELUMul:
    @staticmethod
    def apply(gate, up):
        return ops.geglu(gate, up, approximate="tanh")  # Liger's GEGLU is the tanh GELU


class Rope:
    @staticmethod
    def apply(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        # unsqueeze_dim 1: (b, h, s, d) as HF's apply_rotary_pos_emb; 2: (b, s, h, d)
        return ops.rope(q, k, cos, sin, position_ids=position_ids, layout="bhsd" if unsqueeze_dim == 1 else "bshd")


class FusedMoE:
    @staticmethod
    def apply(x, gate_up_proj, down_proj, top_k_index, top_k_weights):
        # Liger's fused MoE has transformers 5's *Experts signature: the forward patch() installs.
        from types import SimpleNamespace

        from tokenforge.patch import _hf_experts_forward

        experts = SimpleNamespace(gate_up_proj=gate_up_proj, down_proj=down_proj)  # default flags: SwiGLU, (E, out, in)
        return _hf_experts_forward(experts, x, top_k_index, top_k_weights)


liger_ops.LigerRMSNormFunction = RMSNorm
liger_ops.LigerFusedAddRMSNormFunction = FusedAddRMSNorm
liger_ops.LigerCrossEntropyFunction = CrossEntropy
liger_ops.LigerFusedLinearCrossEntropyFunction = FusedLinearCrossEntropy
liger_ops.LigerSiLUMulFunction = SiLUMul
liger_ops.LigerGELUMulFunction = GELUMul
liger_ops.LigerRopeFunction = Rope
liger_ops.LigerFusedMoEFunction = FusedMoE
