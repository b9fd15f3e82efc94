"""Fused optimizers: multi-tensor AdamW and Lion (Triton / CUDA C++ / torch reference), Muon
(Newton-Schulz in Triton, AdamW for the rest) with QK-clip, and multi-tensor gradient clipping.

    opt = tokenforge.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, max_grad_norm=1.0)
    opt = tokenforge.optim.Muon(model, lr=3e-4, adjust_lr_fn="match_rms_adamw")
    tokenforge.optim.clip_grad_norm_(model.parameters(), 1.0)     # drop-in for torch's
"""

from tokenforge.optim.adamw import AdamW, adamw_reference
from tokenforge.optim.clip import clip_grad_norm_
from tokenforge.optim.lion import Lion, lion_reference
from tokenforge.optim.muon import Muon, muon_param_groups
from tokenforge.optim.qk_clip import QKClip

__all__ = ["AdamW", "Lion", "Muon", "QKClip", "adamw_reference", "clip_grad_norm_", "lion_reference",
           "muon_param_groups"]
