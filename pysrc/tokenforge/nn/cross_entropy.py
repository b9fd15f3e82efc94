"""tokenforge.nn.CrossEntropyLoss, LinearCrossEntropyLoss and VocabParallelLinearCrossEntropyLoss: thin
modules over the ops."""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge.ops.cross_entropy import check_class_weight, check_flags, check_options, cross_entropy
from tokenforge.ops.linear_cross_entropy import linear_cross_entropy
from tokenforge.ops.vocab_parallel_cross_entropy import vocab_parallel_linear_cross_entropy


class _LossOptions(torch.nn.Module):
    """What the three loss modules share: the options every cross-entropy op takes, checked once at
    construction (so a bad option fails where the module is built, not at the first step), and a
    repr that names them."""

    def _set_options(self, ignore_index, reduction, label_smoothing, z_loss, softcap, **flags) -> None:
        name = type(self).__name__
        check_options(name, ignore_index, reduction, label_smoothing, z_loss, softcap)
        check_flags(name, **flags)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self._flag_names = tuple(flags)
        for flag, value in flags.items():
            setattr(self, flag, value)

    def _set_class_weight(self, buffer_name: str, weight: Optional[torch.Tensor]) -> None:
        if weight is not None:
            check_class_weight(type(self).__name__, buffer_name, weight, weight.shape[0] if weight.dim() else -1,
                               weight.device)
        self.register_buffer(buffer_name, weight)

    def extra_repr(self) -> str:
        text = (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
        if hasattr(self, "chunk_size"):
            text += f", chunk_size={self.chunk_size}"
        if getattr(self, "weight", None) is not None or getattr(self, "class_weight", None) is not None:
            text += ", weighted"
        return text + "".join(f", {flag}=True" for flag in self._flag_names if getattr(self, flag))


class CrossEntropyLoss(_LossOptions):
    """Like torch.nn.CrossEntropyLoss (class dim last, int64 targets; ``weight`` class weights kept
    as a buffer), plus z_loss and softcap; forward(logits (..., V), target (...)) -> the loss in
    torch's dtype (the logits', fp32 under autocast), or
    a CrossEntropyOutput (loss, z_loss, token_accuracy, predicted_tokens) with ``return_z_loss`` /
    ``return_token_accuracy`` / ``return_predicted_tokens``; ``token_scaling`` as in the op."""

    def __init__(self, weight: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0, *,
                 return_z_loss: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False, token_scaling: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self._set_options(ignore_index, reduction, label_smoothing, z_loss, softcap, return_z_loss=return_z_loss,
                          return_token_accuracy=return_token_accuracy,
                          return_predicted_tokens=return_predicted_tokens, token_scaling=token_scaling)
        self._set_class_weight("weight", weight)
        self.backend = backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor):
        return cross_entropy(logits, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             return_z_loss=self.return_z_loss, return_token_accuracy=self.return_token_accuracy,
                             return_predicted_tokens=self.return_predicted_tokens,
                             token_scaling=self.token_scaling, backend=self.backend)


class LinearCrossEntropyLoss(_LossOptions):
    """Fused lm_head + cross-entropy: forward(hidden (..., H), weight (V, H), target (...), bias=None)
    -> fp32 loss, without materialising the (tokens, V) logits. Holds no parameters: pass the
    lm_head's weight (and bias). ``class_weight`` (a buffer), ``return_z_loss``,
    ``return_token_accuracy``, ``return_predicted_tokens`` and ``token_scaling`` as in
    :class:`CrossEntropyLoss`."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float = 0.0, chunk_size: Optional[int] = None, *,
                 class_weight: Optional[torch.Tensor] = None, return_z_loss: bool = False,
                 return_token_accuracy: bool = False, return_predicted_tokens: bool = False,
                 token_scaling: bool = False, backend: Optional[str] = None) -> None:
        super().__init__()
        self._set_options(ignore_index, reduction, label_smoothing, z_loss, softcap, return_z_loss=return_z_loss,
                          return_token_accuracy=return_token_accuracy,
                          return_predicted_tokens=return_predicted_tokens, token_scaling=token_scaling)
        self._set_class_weight("class_weight", class_weight)
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
        return linear_cross_entropy(hidden, weight, target, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap, class_weight=self.class_weight,
                                    return_z_loss=self.return_z_loss,
                                    return_token_accuracy=self.return_token_accuracy,
                                    return_predicted_tokens=self.return_predicted_tokens,
                                    token_scaling=self.token_scaling, chunk_size=self.chunk_size,
                                    backend=self.backend)


class VocabParallelLinearCrossEntropyLoss(_LossOptions):
    """Fused lm_head + cross-entropy for a head split by vocab rows across a tensor-parallel group:
    forward(hidden (..., H), weight, target (...), bias=None) -> fp32 loss, the same on every rank,
    with neither the logits nor the whole weight on any rank. ``weight``: a ``Shard(0)`` DTensor
    (its mesh gives the group), or this rank's plain rows with ``group`` (the ranks' slices
    consecutive in rank order). See :func:`tokenforge.ops.vocab_parallel_linear_cross_entropy`."""

    def __init__(self, group=None, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float = 0.0, chunk_size: Optional[int] = None, *,
                 token_scaling: bool = False, backend: Optional[str] = None) -> None:
        super().__init__()
        self._set_options(ignore_index, reduction, label_smoothing, z_loss, softcap, token_scaling=token_scaling)
        self.group = group
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return vocab_parallel_linear_cross_entropy(
            hidden, weight, target, bias, group=self.group, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            token_scaling=self.token_scaling, chunk_size=self.chunk_size, backend=self.backend)
