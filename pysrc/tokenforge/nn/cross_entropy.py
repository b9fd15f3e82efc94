"""tokenforge.nn.CrossEntropyLoss and LinearCrossEntropyLoss: thin modules over the ops."""

from __future__ import annotations

from typing import Optional

import torch

from tokenforge.ops.cross_entropy import check_options, cross_entropy
from tokenforge.ops.linear_cross_entropy import linear_cross_entropy


class CrossEntropyLoss(torch.nn.Module):
    """Like torch.nn.CrossEntropyLoss (class dim last, int64 targets, no class weights), plus z_loss
    and softcap; forward(logits (..., V), target (...)) -> fp32 loss."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float = 0.0, *, backend: Optional[str] = None) -> None:
        super().__init__()
        check_options("CrossEntropyLoss", ignore_index, reduction, label_smoothing, z_loss, softcap)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.backend = backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")


class LinearCrossEntropyLoss(torch.nn.Module):
    """Fused lm_head + cross-entropy: forward(hidden (..., H), weight (V, H), target (...), bias=None)
    -> fp32 loss, without materialising the (tokens, V) logits. Holds no parameters: pass the
    lm_head's weight (and bias)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float = 0.0, chunk_size: Optional[int] = None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        check_options("LinearCrossEntropyLoss", ignore_index, reduction, label_smoothing, z_loss, softcap)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, target, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size,
                                    backend=self.backend)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"chunk_size={self.chunk_size}")
