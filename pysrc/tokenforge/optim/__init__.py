"""Fused optimizers: multi-tensor AdamW and Lion (Triton / CUDA C++ / torch reference), and
multi-tensor gradient clipping.

    opt = tokenforge.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, max_grad_norm=1.0)
    tokenforge.optim.clip_grad_norm_(model.parameters(), 1.0)     # drop-in for torch's
"""

from tokenforge.optim.adamw import AdamW, adamw_reference
from tokenforge.optim.clip import clip_grad_norm_
from tokenforge.optim.lion import Lion, lion_reference

__all__ = ["AdamW", "Lion", "adamw_reference", "clip_grad_norm_", "lion_reference"]
