"""The bad-input corpus: every public entry point refuses bad arguments with the right exception
type and a message that names the argument (so the user knows what to fix), never a crash, a hang
or a silently wrong answer. One row per case: (id, call, exception type, words the message names)."""

from __future__ import annotations

import pytest
import torch

import tokenforge
from tokenforge import fp8, nn, ops, optim


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _param(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


CASES = [
    # RMSNorm
    ("rms_norm-int-x", lambda: ops.rms_norm(torch.ones(2, 4, dtype=torch.int32), None), TypeError, ["x"]),
    ("rms_norm-weight-shape", lambda: ops.rms_norm(t(2, 4), t(5)), ValueError, ["weight"]),
    ("rms_norm-neg-eps", lambda: ops.rms_norm(t(2, 4), t(4), eps=-1.0), ValueError, ["eps"]),
    ("rms_norm-scalar-x", lambda: ops.rms_norm(torch.tensor(1.0), None), ValueError, ["x"]),
    ("rms_norm-bad-backend", lambda: ops.rms_norm(t(2, 4), t(4), backend="nope"), ValueError, ["backend"]),
    ("rms_norm-not-tensor", lambda: ops.rms_norm([1.0, 2.0], None), TypeError, ["x"]),
    # residual add + RMSNorm
    ("add_rms_norm-shape", lambda: ops.add_rms_norm(t(2, 4), t(2, 5), t(4)), ValueError, ["residual"]),
    ("add_rms_norm-int", lambda: ops.add_rms_norm(torch.ones(2, 4, dtype=torch.int64), t(2, 4), None),
     TypeError, ["x"]),
    # RoPE
    ("rope-layout", lambda: ops.rope(t(1, 3, 2, 8), t(1, 3, 2, 8), t(3, 8), t(3, 8), layout="sbhd"),
     ValueError, ["layout"]),
    ("rope-odd-dim", lambda: ops.rope(t(1, 3, 2, 7), t(1, 3, 2, 7), t(3, 7), t(3, 7)), ValueError, ["dim"]),
    ("rope-cos-shape", lambda: ops.rope(t(1, 3, 2, 8), t(1, 3, 2, 8), t(4, 6), t(4, 6)), ValueError, ["cos"]),
    ("rope-int-q", lambda: ops.rope(torch.ones(1, 3, 2, 8, dtype=torch.int32), t(1, 3, 2, 8), t(3, 8), t(3, 8)),
     TypeError, ["q"]),
    # SwiGLU
    ("swiglu-shape", lambda: ops.swiglu(t(2, 4), t(2, 5)), ValueError, ["up"]),
    ("swiglu-dtype", lambda: ops.swiglu(t(2, 4), t(2, 4, dtype=torch.float16)), TypeError, ["up"]),
    ("swiglu_packed-odd", lambda: ops.swiglu_packed(t(2, 5)), ValueError, ["gate_up"]),
    # cross-entropy
    ("ce-target-dtype", lambda: ops.cross_entropy(t(4, 10), torch.zeros(4)), TypeError, ["target"]),
    ("ce-target-shape", lambda: ops.cross_entropy(t(4, 10), torch.zeros(5, dtype=torch.long)), ValueError, ["target"]),
    ("ce-reduction", lambda: ops.cross_entropy(t(4, 10), torch.zeros(4, dtype=torch.long), reduction="avg"),
     ValueError, ["reduction"]),
    ("ce-smoothing", lambda: ops.cross_entropy(t(4, 10), torch.zeros(4, dtype=torch.long), label_smoothing=1.5),
     ValueError, ["label_smoothing"]),
    ("ce-out-of-range", lambda: ops.cross_entropy(t(4, 10), torch.full((4,), 10, dtype=torch.long)),
     ValueError, ["target"]),
    ("ce-softcap", lambda: ops.cross_entropy(t(4, 10), torch.zeros(4, dtype=torch.long), softcap=-1.0),
     ValueError, ["softcap"]),
    # fused linear cross-entropy
    ("flce-weight-shape", lambda: ops.linear_cross_entropy(t(4, 8), t(10, 9), torch.zeros(4, dtype=torch.long)),
     ValueError, ["weight"]),
    ("flce-bias-shape", lambda: ops.linear_cross_entropy(t(4, 8), t(10, 8), torch.zeros(4, dtype=torch.long),
                                                          bias=t(11)), ValueError, ["bias"]),
    ("flce-chunk", lambda: ops.linear_cross_entropy(t(4, 8), t(10, 8), torch.zeros(4, dtype=torch.long),
                                                     chunk_size=0), ValueError, ["chunk_size"]),
    # attention
    ("attn-rank", lambda: ops.attention(t(2, 8, 4), t(2, 8, 4), t(2, 8, 4)), ValueError, ["q"]),
    ("attn-gqa", lambda: ops.attention(t(1, 8, 6, 16), t(1, 8, 4, 16), t(1, 8, 4, 16)), ValueError, ["heads"]),
    ("attn-headdim", lambda: ops.attention(t(1, 8, 2, 16), t(1, 8, 2, 32), t(1, 8, 2, 32)), ValueError, ["head"]),
    ("attn-dtype", lambda: ops.attention(t(1, 8, 2, 16), t(1, 8, 2, 16, dtype=torch.float16),
                                         t(1, 8, 2, 16, dtype=torch.float16)), TypeError, ["dtype"]),
    ("attn-window", lambda: ops.attention(t(1, 8, 2, 16), t(1, 8, 2, 16), t(1, 8, 2, 16), window=(1, 2, 3)),
     ValueError, ["window"]),
    ("attn-softcap", lambda: ops.attention(t(1, 8, 2, 16), t(1, 8, 2, 16), t(1, 8, 2, 16), softcap=-2.0),
     ValueError, ["softcap"]),
    ("attn-varlen-cu", lambda: ops.attention_varlen(t(8, 2, 16), t(8, 2, 16), t(8, 2, 16),
                                                    torch.tensor([0, 5, 3], dtype=torch.int32),
                                                    torch.tensor([0, 5, 3], dtype=torch.int32), 5, 5),
     ValueError, ["cu_seqlens"]),
    # FP8
    ("fp8-quantize-scaling", lambda: fp8.quantize(t(4, 8), scaling="blocky"), ValueError, ["scaling"]),
    ("fp8-quantize-dtype", lambda: fp8.quantize(t(4, 8), torch.float16), (TypeError, ValueError), ["dtype"]),
    ("fp8-scaled_mm-not-fp8", lambda: fp8.scaled_mm(t(4, 8), t(8, 4), torch.ones(()), torch.ones(())),
     TypeError, ["fp8", "float8"]),
    ("fp8-dequantize", lambda: fp8.dequantize(t(4, 8), torch.ones(())), TypeError, ["data"]),
    ("fp8-linear-recipe", lambda: fp8.Float8Linear.from_linear(torch.nn.Linear(16, 16), "fastest"), ValueError,
     ["recipe"]),
    # modules
    ("nn-rmsnorm-shape", lambda: nn.RMSNorm(4)(t(2, 5)), ValueError, ["normalized_shape", "shape"]),
    ("nn-addrmsnorm-dim", lambda: nn.AddRMSNorm(0), ValueError, ["dim"]),
    # optimizers
    ("adamw-lr", lambda: optim.AdamW([_param(4)], lr=-1.0), ValueError, ["lr"]),
    ("adamw-betas", lambda: optim.AdamW([_param(4)], betas=(1.5, 0.9)), ValueError, ["beta"]),
    ("adamw-eps", lambda: optim.AdamW([_param(4)], eps=-1e-8), ValueError, ["eps"]),
    ("adamw-state_bits", lambda: optim.AdamW([_param(4)], state_bits=4), ValueError, ["state_bits"]),
    ("adamw-clip", lambda: optim.AdamW([_param(4)], max_grad_norm=0.0), ValueError, ["max_grad_norm"]),
    ("adamw-int-param", lambda: optim.AdamW([torch.nn.Parameter(torch.ones(3, dtype=torch.int64),
                                                                requires_grad=False)]), TypeError, ["param"]),
    ("lion-cuda", lambda: optim.Lion([_param(4)], backend="cuda"), ValueError, ["cuda", "backend"]),
    ("attn-headdim-too-big", lambda: ops.attention(*(t(1, 8, 2, 320, dtype=torch.float16) for _ in range(3)), backend="triton"),
     (ValueError, tokenforge.backends.BackendUnavailableError), ["head_dim", "head dim"]),
    # the reference model and patching
    ("preset-unknown", lambda: tokenforge.models.TransformerConfig.preset("huge"), ValueError, ["preset"]),
    ("patch-not-module", lambda: tokenforge.patch("model"), TypeError, ["model", "nn.Module"]),
]


@pytest.mark.parametrize("call,exc,words", [pytest.param(c, e, w, id=i) for i, c, e, w in CASES])
def test_bad_input_is_refused_clearly(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert any(w.lower() in msg.lower() for w in words), f"message does not name {words}: {msg!r}"
    assert len(msg) >= 20, f"too terse to act on: {msg!r}"


def test_corpus_is_big_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
