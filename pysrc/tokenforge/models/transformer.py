"""A LLaMA-style decoder-only transformer in plain PyTorch: the reference model tokenforge measures.

    token embedding
    n_layers x [ x = x + Attention(RMSNorm(x))        GQA, RoPE, causal
                 x = x + FeedForward(RMSNorm(x)) ]    SwiGLU, or a mixture of SwiGLU experts
                                                      (tokenforge.nn.MoE) after n_dense_layers
    RMSNorm -> output head (optionally tied to the embedding)

Speed lives in the kernels, not here. The few places where tokenforge swaps in a kernel are plain
attributes that hold a function (``Attention.rope_fn``, ``Attention.attention_fn``,
``FeedForward.swiglu_fn``, ``Transformer.loss_fn``) or standard modules (``torch.nn.RMSNorm``), so
``tokenforge.patch`` can replace them without touching parameters or state_dict keys. MoE layers
run the plain loop over experts (``MoE.backend = "torch"``, what an unpatched Mixtral-style model
does); ``tokenforge.patch`` switches them to the grouped GEMM kernels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tokenforge.ops.rope import rope_reference
from tokenforge.ops.swiglu import swiglu_reference


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 32000
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (no GQA)
    hidden_dim: Optional[int] = None  # SwiGLU width; None: LLaMA's rule (8/3 * dim, rounded up)
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Mixture of experts (n_experts = 0: every layer dense). Layers n_dense_layers.. are MoE: top-k
    # of n_experts SwiGLU experts of width moe_hidden_dim (None: ffn_dim), plus n_shared_experts
    # always-on experts of that width; routing options as tokenforge.nn.MoE's.
    n_experts: int = 0
    n_experts_per_token: int = 2
    n_shared_experts: int = 0
    moe_hidden_dim: Optional[int] = None
    n_dense_layers: int = 0
    moe_score: str = "softmax"
    moe_n_groups: int = 1
    moe_topk_groups: int = 1
    moe_routed_scaling: float = 1.0
    moe_aux_loss_coef: float = 0.0
    moe_bias_update_rate: float = 0.0

    def __post_init__(self):
        kv = self.kv_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.n_heads % kv:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {kv}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.n_experts:
            if not 1 <= self.n_experts_per_token <= self.n_experts:
                raise ValueError(f"n_experts_per_token {self.n_experts_per_token} must be in [1, n_experts={self.n_experts}]")
            if not 0 <= self.n_dense_layers <= self.n_layers:
                raise ValueError(f"n_dense_layers {self.n_dense_layers} must be in [0, n_layers={self.n_layers}]")

    @property
    def expert_dim(self) -> int:
        return self.moe_hidden_dim or self.ffn_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and i >= self.n_dense_layers

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers if self.n_experts else 0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TransformerConfig":
        """A named size (``tiny``, ``125m``, ``350m``, ``1b``, ``3b``, ``8b``), fields overridable."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown TransformerConfig field(s): {sorted(unknown)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self, include_embedding: bool = True, active: bool = False) -> int:
        """Parameter count from the shapes alone (no model needed, so 8b or kimi-k2 costs nothing).
        ``active``: the parameters one token uses (an MoE layer's top-k experts, not all of them)."""
        d, kv_dim, f = self.dim, self.kv_heads * self.head_dim, self.ffn_dim
        attn = 2 * d + d * d + 2 * d * kv_dim + d * d  # norms, q, k+v, o
        total = (self.n_layers - self.n_moe_layers) * (attn + 3 * d * f)
        if self.n_moe_layers:
            experts = self.n_experts_per_token if active else self.n_experts
            moe = d * self.n_experts + 3 * d * self.expert_dim * (experts + self.n_shared_experts)  # router, experts
            total += self.n_moe_layers * (attn + moe)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total += d + head
        return total + (self.vocab_size * d if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward): 6 N + 12 L d T, with N the *active*
        parameters that take part in matmuls (all but the embedding lookup; a tied head counts
        once; an MoE layer's top-k and shared experts and its router) and the 12 L d T term the
        attention scores and values (PaLM's MFU convention, no causal discount)."""
        n_matmul = self.num_params(include_embedding=False, active=True) \
            + (self.vocab_size * self.dim if self.tie_embeddings else 0)
        return 6 * n_matmul + 12 * self.n_layers * self.dim * seq_len


PRESETS: dict[str, TransformerConfig] = {
    # CPU tests: small enough for the Triton interpreter, still GQA and multi-layer.
    "tiny": TransformerConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                              max_seq_len=128),
    # GPT-3 Small / Medium widths with LLaMA blocks and a 32k vocabulary.
    "125m": TransformerConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, max_seq_len=2048, tie_embeddings=True),
    "350m": TransformerConfig(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, max_seq_len=2048, tie_embeddings=True),
    # LLaMA 3.2 1B / 3B and LLaMA 3 8B shapes.
    "1b": TransformerConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                            rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True),
    "3b": TransformerConfig(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                            rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True),
    "8b": TransformerConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                            rope_theta=500000.0, max_seq_len=8192),
    # Mixture of experts. moe-tiny: CPU (8 experts, top-2, one shared, a dense first layer).
    "moe-tiny": TransformerConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                                  max_seq_len=128, n_experts=8, n_experts_per_token=2, n_shared_experts=1,
                                  moe_hidden_dim=64, n_dense_layers=1),
    # A trainable GPU MoE: 2.09B total, 0.76B active (16 layers of 1b's width, 16 experts of 1024, top-2 + 1 shared).
    "moe-2b": TransformerConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                                rope_theta=500000.0, max_seq_len=4096, tie_embeddings=True, n_experts=16,
                                n_experts_per_token=2, n_shared_experts=1, moe_hidden_dim=1024, n_dense_layers=1,
                                moe_bias_update_rate=1e-3),
    # Config-only (num_params, flops_per_token, tokenforge cost): the published shapes with GQA in
    # place of multi-head latent attention, sized so total / active match within a few percent:
    # DeepSeek-V3 671B / 37B (here ~672B / ~38B), Kimi K2 1.04T / 32B (here ~1.03T / ~34B).
    "deepseek-v3": TransformerConfig(vocab_size=129280, dim=7168, n_layers=61, n_heads=128, hidden_dim=18432,
                                     max_seq_len=4096, n_experts=256, n_experts_per_token=8, n_shared_experts=1,
                                     moe_hidden_dim=2048, n_dense_layers=3, moe_score="sigmoid", moe_n_groups=8,
                                     moe_topk_groups=4, moe_routed_scaling=2.5, moe_bias_update_rate=1e-3),
    "kimi-k2": TransformerConfig(vocab_size=163840, dim=7168, n_layers=61, n_heads=64, n_kv_heads=8, hidden_dim=18432,
                                 max_seq_len=4096, n_experts=384, n_experts_per_token=8, n_shared_experts=1,
                                 moe_hidden_dim=2048, n_dense_layers=1, moe_score="sigmoid", moe_routed_scaling=2.827,
                                 moe_bias_update_rate=1e-3),
}
CONFIG_ONLY_PRESETS = ("deepseek-v3", "kimi-k2")  # priced and counted, never built by tokenforge train


def rope_tables(cfg: TransformerConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim) in Hugging Face's half-split layout, fp32."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64, device=device) / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over (batch, seq, heads, head_dim) with GQA, through torch's SDPA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def logits_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of the head's logits h @ weight.T (computed in fp32) against targets."""
    logits = h @ weight.t()
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.rope_fn = rope_reference          # (q, k, cos, sin) -> (q, k), (batch, seq, heads, dim)
        self.attention_fn = sdpa_causal        # (q, k, v) -> out, (batch, seq, heads, dim), causal

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = self.rope_fn(q, k, cos, sin)
        out = self.attention_fn(q, k, v)
        return self.wo(out.reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down
        self.swiglu_fn = swiglu_reference      # (gate, up) -> silu(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.swiglu_fn(self.w1(x), self.w3(x)))


def add_then_norm(delta: torch.Tensor, residual: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + delta), residual + delta): the residual add and the norm after it, the swap
    point tokenforge.patch fuses into one pass (tokenforge.ops.add_rms_norm)."""
    h = residual + delta
    return norm(h), h


def moe_feed_forward(cfg: TransformerConfig) -> nn.Module:
    """The MoE layer of a config, running the plain loop over experts until tokenforge.patch."""
    from tokenforge.nn.moe import MoE

    return MoE(cfg.dim, cfg.expert_dim, cfg.n_experts, cfg.n_experts_per_token,
               num_shared_experts=cfg.n_shared_experts, score=cfg.moe_score, normalize=True,
               n_groups=cfg.moe_n_groups, topk_groups=cfg.moe_topk_groups, routed_scaling=cfg.moe_routed_scaling,
               aux_loss_coef=cfg.moe_aux_loss_coef, bias_update_rate=cfg.moe_bias_update_rate, backend="torch")


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, index: int = 0):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = moe_feed_forward(cfg) if cfg.is_moe_layer(index) else FeedForward(cfg)
        self.add_norm_fn = add_then_norm       # (delta, residual, norm) -> (normed, residual + delta)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        normed, h = self.add_norm_fn(self.attention(self.attention_norm(x), cos, sin), x, self.ffn_norm)
        return h + self.feed_forward(normed)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg)
        # Not in the state_dict: recomputed from the config, and kept fp32 under .to(bf16) via _apply.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.loss_fn = logits_cross_entropy   # (h, head weight, targets) -> mean loss
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight", "w_down", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
            elif name.endswith("w_gate_up"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def _apply(self, fn, recurse=True):
        # Keep the RoPE tables in fp32 when the model is cast to bf16/fp16 (angles need the bits).
        super()._apply(fn, recurse)
        self.rope_cos, self.rope_sin = self.rope_cos.float(), self.rope_sin.float()
        return self

    def moe_aux_loss(self) -> Optional[torch.Tensor]:
        """The sum of the MoE layers' auxiliary losses of the last forward (None without any)."""
        losses = [m.aux_loss for m in self.modules() if getattr(m, "aux_loss", None) is not None]
        return sum(losses) if losses else None

    def expert_load(self) -> Optional[torch.Tensor]:
        """(MoE layers, experts) tokens per expert of the last forward (None for a dense model)."""
        counts = [m.last_expert_counts for m in self.modules() if getattr(m, "last_expert_counts", None) is not None]
        return torch.stack(counts) if counts else None

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameters of this model (a tied head counted once)."""
        n = sum(p.numel() for p in self.parameters())
        return n if include_embedding else n - self.tok_embeddings.weight.numel()

    def flops_per_token(self, seq_len: int) -> int:
        return self.cfg.flops_per_token(seq_len)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx (batch, seq) token ids -> logits (batch, seq, vocab); with targets (batch, seq), the
        mean cross-entropy instead (ignore_index -100), computed by ``loss_fn`` from the final
        hidden states, so a fused linear cross-entropy never materialises the logits."""
        _, t = idx.shape
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} > max_seq_len {self.cfg.max_seq_len}; raise it in the config")
        x = self.tok_embeddings(idx)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for layer in self.layers:
            x = layer(x, cos, sin)
        h = self.norm(x)
        if targets is None:
            return self.output(h)
        loss = self.loss_fn(h, self.output.weight, targets)
        aux = self.moe_aux_loss() if self.cfg.moe_aux_loss_coef > 0 else None
        return loss if aux is None else loss + aux
