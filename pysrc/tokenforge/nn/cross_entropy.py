"""tokenforge.nn.CrossEntropyLoss and LinearCrossEntropyLoss: thin modules over the ops."""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge.ops.cross_entropy import check_class_weight, check_flags, check_options, cross_entropy
from tokenforge.ops.linear_cross_entropy import linear_cross_entropy
from tokenforge.ops.vocab_parallel_cross_entropy import vocab_parallel_linear_cross_entropy


class CrossEntropyLoss(torch.nn.Module):
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
        check_options("CrossEntropyLoss", ignore_index, reduction, label_smoothing, z_loss, softcap)
        check_flags("CrossEntropyLoss", return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
                    return_predicted_tokens=return_predicted_tokens, token_scaling=token_scaling)
        if weight is not None:
            check_class_weight("CrossEntropyLoss", "weight", weight, weight.shape[0] if weight.dim() else -1,
                               weight.device)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens
        self.token_scaling = token_scaling
        self.backend = backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor):
        return cross_entropy(logits, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             return_z_loss=self.return_z_loss, return_token_accuracy=self.return_token_accuracy,
                             return_predicted_tokens=self.return_predicted_tokens,
                             token_scaling=self.token_scaling, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}"
                + (", weighted" if self.weight is not None else "")
                + (", return_z_loss=True" if self.return_z_loss else "")
                + (", return_token_accuracy=True" if self.return_token_accuracy else "")
                + (", return_predicted_tokens=True" if self.return_predicted_tokens else "")
                + (", token_scaling=True" if self.token_scaling else ""))


class LinearCrossEntropyLoss(torch.nn.Module):
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
        check_options("LinearCrossEntropyLoss", ignore_index, reduction, label_smoothing, z_loss, softcap)
        check_flags("LinearCrossEntropyLoss", return_z_loss=return_z_loss,
                    return_token_accuracy=return_token_accuracy, return_predicted_tokens=return_predicted_tokens,
                    token_scaling=token_scaling)
        if class_weight is not None:
            check_class_weight("LinearCrossEntropyLoss", "class_weight", class_weight,
                               class_weight.shape[0] if class_weight.dim() else -1, class_weight.device)
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens
        self.token_scaling = token_scaling
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

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size}" + (", weighted" if self.class_weight is not None else "")
                + (", return_z_loss=True" if self.return_z_loss else "")
                + (", return_token_accuracy=True" if self.return_token_accuracy else "")
                + (", return_predicted_tokens=True" if self.return_predicted_tokens else "")
                + (", token_scaling=True" if self.token_scaling else ""))


class VocabParallelLinearCrossEntropyLoss(torch.nn.Module):
    """Fused lm_head + cross-entropy for a head split by vocab rows across a tensor-parallel group:
    forward(hidden (..., H), weight, target (...), bias=None) -> fp32 loss, the same on every rank,
    with neither the logits nor the whole weight on any rank. ``weight``: a ``Shard(0)`` DTensor
    (its mesh gives the group), or this rank's plain rows with ``group`` (the ranks' slices
    consecutive in rank order). See :func:`tokenforge.ops.vocab_parallel_linear_cross_entropy`."""

    def __init__(self, group=None, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float = 0.0, chunk_size: Optional[int] = None, *,
                 token_scaling: bool = False, backend: Optional[str] = None) -> None:
        super().__init__()
        check_options("VocabParallelLinearCrossEntropyLoss", ignore_index, reduction, label_smoothing, z_loss, softcap)
        check_flags("VocabParallelLinearCrossEntropyLoss", token_scaling=token_scaling)
        self.group = group
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.token_scaling = token_scaling
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return vocab_parallel_linear_cross_entropy(
            hidden, weight, target, bias, group=self.group, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            token_scaling=self.token_scaling, chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size}" + (", token_scaling=True" if self.token_scaling else ""))
