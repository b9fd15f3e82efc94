"""One call to put tokenforge's kernels into a model: ``report = tokenforge.patch(model)``.

Three families of model are recognised:

- ``tokenforge.models.Transformer``: its swap points (``nn.RMSNorm`` modules, ``Attention.rope_fn``
  / ``attention_fn``, ``FeedForward.swiglu_fn``, ``Transformer.loss_fn``) are replaced.
- Hugging Face causal LMs of the families in ``_HF_FAMILIES`` (Llama, Mistral, Qwen2, Qwen3, Phi3,
  OLMo2, Gemma, Gemma2, Gemma3 text, SmolLM3, Ministral, Ministral3, Seed-OSS, Helium, OLMo3,
  EXAONE 4; and the MoE Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, MiniMax, ERNIE 4.5 MoE, DeepSeek-V3
  and V2, GLM-4-MoE, dots1, Hunyuan MoE, GPT-OSS, FlexOlmo, Qwen3-Next, Qwen3.5-MoE: no dense MLP to
  fuse, the load-balancing loss kept in the fused loss): RMSNorm modules (q/k norms included; each family's own semantics: Llama's
  ``weight * x_hat.to(dtype)``, OLMo2's ``(weight * x_hat).to(dtype)``, Gemma's ``(1 + weight)``),
  the MLP's gated activation (SwiGLU, Phi3's packed gate_up, Gemma's GeGLU; Seed-OSS's dropout after
  it kept), rotary embeddings (the modeling module's ``apply_rotary_pos_emb``, partial rotary
  included, Helium's interleaved pairs), and,
  while training, the causal-LM loss through the fused linear cross-entropy (logits never
  materialised; Gemma2/3's final logit softcap inside it), and attention: ``attn_implementation``
  "sdpa" / "eager" -> tokenforge's Hugging Face implementation (``tokenforge/hf_attention.py``:
  padded and packed batches as varlen documents; SDPA routing on transformers before 4.53). In eval mode, or whenever the fused loss
  would not compute what the model's own loss does, the original forward runs: logits come back
  for ``Trainer.evaluate(compute_metrics=...)``, and ``return_dict=False`` and ``use_cache`` behave
  as unpatched. ``model(..., skip_logits=False)`` asks for logits while training (the original
  forward), ``skip_logits=True`` for the fused loss in eval mode.
- Anything else (the generic patch): ``torch.nn.RMSNorm`` modules, ``F.scaled_dot_product_attention``
  calls, and with ``fp8=True`` eligible ``nn.Linear`` layers. The report says the architecture was
  not recognised.

On every model, transformers' mixture-of-experts modules run as grouped GEMMs: each experts module
whose forward is transformers' ``use_experts_implementation`` dispatch (as its flags describe it:
layout, biases, gate, post-expert norm), and Llama 4's MoE block (top-k instead of every expert).

Parameters are never copied or re-created: a patched model has the same parameters and state_dict
keys. ``tokenforge.unpatch(model)`` undoes every change, in reverse order. Each change and each
skipped option is listed in the returned :class:`PatchReport`; nothing is skipped silently.

One caveat: Hugging Face's rotary function and ``F.scaled_dot_product_attention`` (the generic
patch's) are module-level functions, so patching them affects every model of that architecture (every SDPA call) in the
process while at least one patched model exists (reference counted; the last ``unpatch`` restores
them). SDPA calls the kernel does not support pass through to PyTorch unchanged.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from tokenforge.dtensor import is_dtensor

# transformers versions whose model classes this file was written against and is tested with.
TRANSFORMERS_TESTED = ">=4.50,<5.26"



@dataclass(frozen=True)
class HFFamily:
    """What differs between the Hugging Face causal-LM families patch() knows."""

    module: str             # transformers.models.<module>.modeling_<module>
    norm: str = "llama"     # HFRMSNorm semantics: "llama", "fp32_product" (OLMo2) or "offset" (Gemma)
    mlp: str = "split"      # "split": gate_proj/up_proj/down_proj/act_fn; "packed": Phi3's gate_up_proj;
                            # "moe": sparse MoE blocks (their experts patched as every model's are)
    rope: str = "half"      # "half": rotate_half over halves (Llama); "interleaved": pairs (2i, 2i+1) (Helium);
                            # "half_width": Llama's halves from half-width cos/sin (GPT-OSS);
                            # "own": the family's rotary function is not Llama's, and is left alone
    aux_loss: bool = False  # the causal LM adds load_balancing_loss_func(router_logits) x router_aux_loss_coef


_HF_FAMILIES = {
    "LlamaForCausalLM": HFFamily("llama"),
    "MistralForCausalLM": HFFamily("mistral"),
    "Qwen2ForCausalLM": HFFamily("qwen2"),
    "Qwen3ForCausalLM": HFFamily("qwen3"),
    "Phi3ForCausalLM": HFFamily("phi3", mlp="packed"),
    "Olmo2ForCausalLM": HFFamily("olmo2", norm="fp32_product"),
    "GemmaForCausalLM": HFFamily("gemma", norm="offset"),
    "Gemma2ForCausalLM": HFFamily("gemma2", norm="offset"),
    "Gemma3ForCausalLM": HFFamily("gemma3", norm="offset"),
    "SmolLM3ForCausalLM": HFFamily("smollm3"),
    "MinistralForCausalLM": HFFamily("ministral"),
    "Ministral3ForCausalLM": HFFamily("ministral3"),
    "SeedOssForCausalLM": HFFamily("seed_oss"),
    "HeliumForCausalLM": HFFamily("helium", norm="fp32_product", rope="interleaved"),
    "Olmo3ForCausalLM": HFFamily("olmo3", norm="fp32_product"),
    "Exaone4ForCausalLM": HFFamily("exaone4"),
    # MoE families whose RMSNorm and (where patched) rotary function are Llama's (their source read
    # against Llama's), and whose causal LM loss is Llama's plus, with output_router_logits, the
    # family's load-balancing loss (tests/test_patch_hf_moe.py::test_known_moe_family_full_patch).
    "MixtralForCausalLM": HFFamily("mixtral", mlp="moe", aux_loss=True),
    "Qwen2MoeForCausalLM": HFFamily("qwen2_moe", mlp="moe", aux_loss=True),
    "Qwen3MoeForCausalLM": HFFamily("qwen3_moe", mlp="moe", aux_loss=True),
    "OlmoeForCausalLM": HFFamily("olmoe", mlp="moe", aux_loss=True),
    "MiniMaxForCausalLM": HFFamily("minimax", mlp="moe", aux_loss=True),
    "Ernie4_5_MoeForCausalLM": HFFamily("ernie4_5_moe", mlp="moe", rope="own", aux_loss=True),
    "DeepseekV3ForCausalLM": HFFamily("deepseek_v3", mlp="moe"),
    "DeepseekV2ForCausalLM": HFFamily("deepseek_v2", mlp="moe", rope="own"),
    "Glm4MoeForCausalLM": HFFamily("glm4_moe", mlp="moe", rope="own"),
    "Dots1ForCausalLM": HFFamily("dots1", mlp="moe"),
    "HunYuanMoEV1ForCausalLM": HFFamily("hunyuan_v1_moe", mlp="moe"),
    # OLMo2's norm semantics; GPT-OSS's rotary function takes half-width cos/sin, FlexOlmo's its own
    "GptOssForCausalLM": HFFamily("gpt_oss", norm="fp32_product", mlp="moe", rope="half_width", aux_loss=True),
    "FlexOlmoForCausalLM": HFFamily("flex_olmo", norm="fp32_product", mlp="moe", rope="own", aux_loss=True),
    # Gemma's zero-centred norm, partial rotary (Llama's on the leading dims); their linear-attention
    # layers (Gated DeltaNet) take their own 2-D padding mask and are left alone
    "Qwen3NextForCausalLM": HFFamily("qwen3_next", norm="offset", mlp="moe", aux_loss=True),
    "Qwen3_5MoeForCausalLM": HFFamily("qwen3_5_moe", norm="offset", mlp="moe", aux_loss=True),
}
# Other Hugging Face MoE families (patched generically: experts, SDPA) whose attention layers call
# transformers' attention functions as Llama's do, with masks from masking_utils: they get
# tokenforge's Hugging Face attention implementation (tests/test_patch_hf_moe.py checks each).
_HF_MOE_ATTENTION = {"granitemoe", "lfm2_moe"}
_UNDO_ATTR = "_tokenforge_undo"


def _own(model: nn.Module, name: str):
    """An attribute set on this very object (object.__setattr__), never one a wrapper forwards: PEFT's
    PeftModel answers unknown attributes from the model it wraps."""
    return vars(model).get(name)

# How many times each patched-in kernel path ran (eager calls; traced calls under torch.compile are
# not counted) since the process started: `tokenforge run`'s report, tests, debugging.
calls: dict[str, int] = {}


def count_call(op: str) -> None:
    if not torch.compiler.is_compiling():
        calls[op] = calls.get(op, 0) + 1


@dataclass
class PatchReport:
    """What ``tokenforge.patch`` did to a model."""

    model: str
    family: str
    patched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # With patch(..., optimizer=opt): tokenforge's fused equivalent, same groups and state (or opt
    # itself when there is none); use it in place of opt from then on.
    optimizer: Any = None

    def __str__(self) -> str:
        lines = [f"tokenforge.patch({self.model}): family {self.family}"]
        lines += [f"  patched  {p}" for p in self.patched]
        lines += [f"  skipped  {s}" for s in self.skipped]
        return "\n".join(lines)


class _Undo:
    """The changes made to one model, undone in reverse order."""

    def __init__(self):
        self.steps: list[Callable[[], None]] = []

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        had = name in vars(obj) if hasattr(obj, "__dict__") else False
        old = vars(obj).get(name) if had else None
        if isinstance(obj, nn.Module) and isinstance(getattr(obj, name, None), nn.Module):
            old_module = getattr(obj, name)
            setattr(obj, name, value)
            self.steps.append(lambda: setattr(obj, name, old_module))
            return
        setattr(obj, name, value)
        if had:
            self.steps.append(lambda: setattr(obj, name, old))
        else:
            self.steps.append(lambda: delattr(obj, name))

    def run(self) -> None:
        for step in reversed(self.steps):
            step()
        self.steps.clear()


# Module-level functions patched for every model of a family, reference counted.
_GLOBAL_PATCHES: dict[tuple[str, str], list] = {}


def _patch_global(undo: _Undo, module_name: str, attr: str, value: Callable) -> None:
    module = importlib.import_module(module_name)
    key = (module_name, attr)
    if key not in _GLOBAL_PATCHES:
        _GLOBAL_PATCHES[key] = [getattr(module, attr), 0]
        setattr(module, attr, value)
    _GLOBAL_PATCHES[key][1] += 1

    def release():
        entry = _GLOBAL_PATCHES[key]
        entry[1] -= 1
        if entry[1] == 0:
            setattr(module, attr, entry[0])
            del _GLOBAL_PATCHES[key]

    undo.steps.append(release)


# ---------------------------------------------------------------------------------------------
# Kernel-backed replacements (plain functions, so torch.compile traces straight into the ops)
# ---------------------------------------------------------------------------------------------


def _rope_bshd(q, k, cos, sin):
    from tokenforge.ops.rope import rope

    count_call("rope")
    return rope(q, k, cos, sin, layout="bshd")


def _hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **_ignored):
    """Hugging Face's apply_rotary_pos_emb signature; q, k (batch, heads, seq, dim) when
    unsqueeze_dim is 1 (the models' default), (batch, seq, heads, dim) when it is 2. cos/sin
    narrower than the head dim (Phi3's partial rotary) rotate the leading dims only, as there."""
    from tokenforge.ops.rope import rope

    count_call("rope")
    return rope(q, k, cos, sin, layout="bhsd" if unsqueeze_dim == 1 else "bshd")


def _hf_apply_rotary_pos_emb_half_width(q, k, cos, sin, unsqueeze_dim=1, **_ignored):
    """GPT-OSS's apply_rotary_pos_emb: cos/sin hold each frequency once (half the head dim) and the
    halves rotate as Llama's do, so [f | f] is Llama's call."""
    return _hf_apply_rotary_pos_emb(q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1), unsqueeze_dim)


def _hf_apply_rotary_pos_emb_interleaved(q, k, cos, sin, unsqueeze_dim=1, **_ignored):
    """The interleaved families' apply_rotary_pos_emb (Helium): Hugging Face's cos/sin hold each
    frequency twice, as [f | f]; there the first half is repeated per pair (f0 f0 f1 f1 ...), which
    is what the interleaved kernel takes."""
    from tokenforge.ops.rope import rope

    count_call("rope")
    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
    sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
    return rope(q, k, cos, sin, interleaved=True, layout="bhsd" if unsqueeze_dim == 1 else "bshd")


def _swiglu(gate, up, fp8=None):
    from tokenforge.ops.swiglu import swiglu

    count_call("swiglu")
    return swiglu(gate, up, fp8=fp8)


def _matching_dtypes(h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dtypes the unfused head matmul would use: autocast's when it is on, else the weight's."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return h.to(dtype), weight.to(dtype)
    return h.to(weight.dtype), weight


def _fused_linear_cross_entropy(h, weight, targets, ignore_index: int = -100):
    """Drop-in for Transformer.loss_fn: mean cross-entropy of h @ weight.T without the logits."""
    from tokenforge.ops.linear_cross_entropy import linear_cross_entropy

    h, weight = _matching_dtypes(h, weight)
    count_call("linear_cross_entropy")
    return linear_cross_entropy(h.flatten(0, -2), weight, targets.flatten(), ignore_index=ignore_index)


def _attention_available() -> Optional[str]:
    try:
        from tokenforge.ops import attention  # noqa: F401
    except ImportError:
        return "tokenforge has no attention kernel in this build"
    return None


# Patched models that rely on the process-wide SDPA routing, and whether patch() installed it.
_SDPA_USERS = {"count": 0, "installed_by_patch": False}


def _use_sdpa_routing(undo: _Undo) -> None:
    """Route F.scaled_dot_product_attention to tokenforge while at least one patched model needs it."""
    from tokenforge import sdpa_patch

    if _SDPA_USERS["count"] == 0 and not sdpa_patch.is_installed():
        sdpa_patch.install()
        _SDPA_USERS["installed_by_patch"] = True
    _SDPA_USERS["count"] += 1

    def release():
        _SDPA_USERS["count"] -= 1
        if _SDPA_USERS["count"] == 0 and _SDPA_USERS["installed_by_patch"]:
            sdpa_patch.uninstall()
            _SDPA_USERS["installed_by_patch"] = False

    undo.steps.append(release)


def _causal_attention_bshd(q, k, v):
    from tokenforge.ops.attention import attention

    count_call("attention")
    return attention(q, k, v, causal=True)


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------


def _replace_rms_norms(model: nn.Module, undo: _Undo, report: PatchReport, classes: tuple, make: Callable,
                       target: str = "tokenforge.nn.RMSNorm") -> None:
    count = 0
    unknown: dict[str, int] = {}  # other classes named like an RMSNorm: left alone, and said so
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in classes:
                undo.set_attr(parent, name, make(child))
                count += 1
            elif "rmsnorm" in type(child).__name__.lower() and not isinstance(child, (HFRMSNorm, *_tokenforge_norm_classes())):
                unknown[type(child).__name__] = unknown.get(type(child).__name__, 0) + 1
    if count:
        report.patched.append(f"rms_norm: {count} {'/'.join(c.__name__ for c in classes)} module(s) -> {target}")
    else:
        report.skipped.append(f"rms_norm: no {'/'.join(c.__name__ for c in classes)} module found")
    for cls_name, n in sorted(unknown.items()):
        report.skipped.append(f"rms_norm: {n} {cls_name} module(s) left alone: a class tokenforge does not know "
                              "(its exact semantics unverified; replace it with tokenforge.nn.RMSNorm if it is "
                              "weight * x / rms(x))")


def _tokenforge_norm_classes() -> tuple:
    from tokenforge.nn.add_rms_norm import AddRMSNorm
    from tokenforge.nn.rms_norm import RMSNorm

    return (RMSNorm, AddRMSNorm)


def _fused_add_rms_norm(delta, residual, norm):
    """Block.add_norm_fn fused: one pass reads delta and residual, writes the sum and its norm."""
    from tokenforge.ops.add_rms_norm import add_rms_norm

    eps = norm.eps if norm.eps is not None else torch.finfo(residual.dtype).eps
    count_call("add_rms_norm")
    return add_rms_norm(delta, residual, norm.weight, eps, backend=getattr(norm, "backend", None),
                        fp8=getattr(norm, "fp8_emit", None))


def _patch_tokenforge_transformer(model, undo, report, opts) -> None:
    from tokenforge.models.transformer import Attention, Block, FeedForward
    from tokenforge.nn.moe import MoE
    from tokenforge.nn.rms_norm import RMSNorm

    if opts["rms_norm"]:
        _replace_rms_norms(model, undo, report, (nn.RMSNorm,), RMSNorm.from_torch)
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        for m in blocks:
            undo.set_attr(m, "add_norm_fn", _fused_add_rms_norm)
        report.patched.append(f"add_rms_norm: {len(blocks)} Block.add_norm_fn (residual add + ffn_norm) "
                              "-> tokenforge.ops.add_rms_norm")
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    if opts["rope"]:
        for m in attentions:
            undo.set_attr(m, "rope_fn", _rope_bshd)
        report.patched.append(f"rope: {len(attentions)} Attention.rope_fn -> tokenforge.ops.rope")
    if opts["attention"]:
        reason = _attention_available()
        if reason:
            report.skipped.append(f"attention: {reason}")
        else:
            for m in attentions:
                undo.set_attr(m, "attention_fn", _causal_attention_bshd)
            report.patched.append(f"attention: {len(attentions)} Attention.attention_fn -> tokenforge.ops.attention")
    if opts["swiglu"]:
        ffns = [m for m in model.modules() if isinstance(m, FeedForward)]
        for m in ffns:
            undo.set_attr(m, "swiglu_fn", _swiglu)
        report.patched.append(f"swiglu: {len(ffns)} FeedForward.swiglu_fn -> tokenforge.ops.swiglu")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if moes and opts["moe"]:
        for m in moes:
            undo.set_attr(m, "backend", None)
            if m.shared_experts is not None:
                undo.set_attr(m.shared_experts, "backend", None)
        report.patched.append(f"moe: {len(moes)} MoE layers: loop over experts -> tokenforge.ops.grouped_mm "
                              "(+ swiglu_packed, the moe_permute / moe_unpermute kernels)")
    if opts["cross_entropy"]:
        undo.set_attr(model, "loss_fn", _fused_linear_cross_entropy)
        report.patched.append("cross_entropy: Transformer.loss_fn -> tokenforge.ops.linear_cross_entropy (no logits)")


class HFRMSNorm(nn.Module):
    """A Hugging Face RMSNorm module on tokenforge's kernel, sharing the original's weight. The
    families differ only in where the weight multiplies and in which dtype:

    - "llama" (Llama, Mistral, Qwen2/3, Phi3): ``weight * x_hat.to(input_dtype)``, so an fp32
      weight gives an fp32 output;
    - "fp32_product" (OLMo2): ``(weight * x_hat).to(input_dtype)``;
    - "offset" (Gemma, Gemma2, Gemma3): ``(x_hat * (1 + weight.float())).to(input_dtype)``."""

    def __init__(self, original: nn.Module, semantics: str = "llama"):
        super().__init__()
        self.weight = original.weight
        eps = getattr(original, "variance_epsilon", getattr(original, "eps", None))
        self.variance_epsilon = self.eps = eps
        self.semantics = semantics

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from tokenforge.ops.rms_norm import rms_norm

        count_call("rms_norm")
        if self.semantics == "offset":
            return rms_norm(hidden_states, self.weight, self.variance_epsilon, offset=1.0)
        out = rms_norm(hidden_states, self.weight, self.variance_epsilon)
        if self.semantics == "fp32_product":
            return out
        out_dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
        return out if out.dtype == out_dtype else out.to(out_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, {self.semantics} (tokenforge)"


def _activation_name(act) -> Optional[str]:
    """"silu", "gelu_tanh" or "gelu" when ``act`` computes that function (nn.SiLU, transformers'
    SiLUActivation, GELUTanh, PytorchGELUTanh, ...): checked on values, never by name; else None."""
    if not callable(act):
        return None
    from tokenforge.ops.swiglu import ACTIVATIONS

    probe = torch.tensor([-4.0, -2.0, -0.5, 0.0, 0.7, 2.0, 4.0], dtype=torch.float64)
    try:
        got = act(probe)
    except Exception:  # an activation that cannot take a CPU tensor is not one we can vouch for
        return None
    for name, fn in ACTIVATIONS.items():
        if isinstance(got, torch.Tensor) and got.shape == probe.shape and torch.allclose(got.double(), fn(probe), atol=1e-7):
            return name
    return None


def _is_silu(act) -> bool:
    return _activation_name(act) == "silu"


def _gated(gate, up, activation: str):
    """act(gate) * up on the kernel: SwiGLU or GeGLU."""
    from tokenforge.ops.swiglu import geglu

    if activation == "silu":
        return _swiglu(gate, up)
    count_call("geglu")
    return geglu(gate, up, "tanh" if activation == "gelu_tanh" else "none")


def _hf_mlp_forward(self, x):
    # LlamaMLP.forward with the gate activation and product fused: down(act(gate(x)) * up(x)), then
    # the dropout some families apply there (Seed-OSS's residual_dropout), as theirs does.
    out = self.down_proj(_gated(self.gate_proj(x), self.up_proj(x), self._tokenforge_activation))
    p = getattr(self, "residual_dropout", 0.0)
    return nn.functional.dropout(out, p=p, training=self.training) if p else out


def _hf_packed_mlp_forward(self, x):
    # Phi3MLP.forward: gate_up_proj (.., 2I) = [gate | up], down(up * silu(gate)) on the packed kernel.
    from tokenforge.ops.swiglu import swiglu_packed

    count_call("swiglu")
    return self.down_proj(swiglu_packed(self.gate_up_proj(x)))


def _with_signature_of(original: Callable, replacement: Callable) -> Callable:
    """``replacement`` as seen by inspect.signature: the original's parameters. Trainer drops the
    dataset columns that model.forward's signature does not name (input_ids among them for a bare
    ``(*args, **kwargs)``)."""
    def forward(self, *args, **kwargs):
        return replacement(self, *args, **kwargs)

    functools.update_wrapper(forward, original)
    forward.__doc__ = replacement.__doc__
    return forward


def _fused_loss_unusable(model, arguments: dict, skip_logits: Optional[bool]) -> Optional[str]:
    """None when the fused linear cross-entropy computes exactly the loss the original forward
    would; else why the original forward runs instead. ``skip_logits`` (Liger's keyword) asks:
    True for the fused loss even in eval mode, False for logits even while training."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    if arguments.get("labels") is None:
        if skip_logits:
            raise ValueError("skip_logits=True needs labels: without them there is no loss to fuse the logits into")
        return "no labels"
    if skip_logits is False:
        return "skip_logits=False (logits are returned)"
    if not model.training and not skip_logits:
        return "eval mode (logits are returned)"
    if arguments.get("logits_to_keep", 0) not in (0, None):
        return "logits_to_keep"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return "a custom loss_function"
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        # A LoRA layer or another wrapper computes more than weight @ h: the fused loss reads only
        # a plain Linear's weight (an adapter may be added after patch, as under `tokenforge run`).
        return f"lm_head is a {type(head).__name__}, not a plain Linear"
    return None


def _field_names(output_cls) -> set:
    import dataclasses

    return {f.name for f in dataclasses.fields(output_cls)}


def _gathers_in_forward(head: torch.nn.Module) -> bool:
    """Whether the head's weight exists whole only inside its own forward: FSDP2 (fully_shard on the
    head) all-gathers it in a pre-forward hook and reduce-scatters its gradient from hooks set up
    there; DeepSpeed ZeRO-3 gathers partitioned parameters around forward the same way."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        FSDPModule = ()
    return isinstance(head, FSDPModule) or hasattr(getattr(head, "weight", None), "ds_id")


def _head_loss(head: torch.nn.Module, hidden: torch.Tensor, fused_loss):
    """``fused_loss(hidden, weight, bias)`` on the LM head's parameters. Where the head is sharded by
    FSDP2 or ZeRO-3 it runs as the head's forward (swapped in for this call), so their hooks gather
    the weight first and reduce its gradient after, as around the unfused matmul; the hooks' version
    of hidden is the one used, as their backward bookkeeping hangs on it. A tensor-parallel head's
    DTensor weight goes to fused_loss as it is (the vocab-parallel loss: each rank its rows)."""
    if not _gathers_in_forward(head):
        return fused_loss(hidden, head.weight, getattr(head, "bias", None))
    own = vars(head).get("forward")  # a forward set on the instance by someone else stays theirs
    head.forward = lambda h: fused_loss(h, head.weight, getattr(head, "bias", None))
    try:
        return head(hidden)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _hf_causal_lm_forward(self, *args, **kwargs):
    """CausalLM forward that, while training with labels, computes the shifted next-token loss from
    the final hidden states with the fused linear cross-entropy (no logits are returned then);
    otherwise (eval, no labels, logits_to_keep, a custom loss, ``skip_logits=False``) the original
    forward runs. ``skip_logits=True`` takes the fused loss in eval mode too."""
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    original, signature = self._tokenforge_original_forward, self._tokenforge_forward_signature
    spec = self._tokenforge_family_spec
    skip_logits = kwargs.pop("skip_logits", None)
    try:
        arguments = dict(signature.bind(*args, **kwargs).arguments)
    except TypeError:
        return original(*args, **kwargs)  # let the original raise its own error
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    if _fused_loss_unusable(self, arguments, skip_logits) is not None:
        return original(*args, **kwargs)
    labels = arguments.pop("labels")
    arguments.pop("logits_to_keep", None)
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    ignore_index = arguments.pop("ignore_index", -100)
    shift_labels = arguments.pop("shift_labels", None)
    router_logits_wanted = False
    if "output_router_logits" in signature.parameters:  # as the MoE causal LMs resolve it
        router_logits_wanted = arguments.get("output_router_logits")
        if router_logits_wanted is None:
            router_logits_wanted = bool(getattr(self.config, "output_router_logits", False))
        arguments["output_router_logits"] = router_logits_wanted
    outputs = self.model(**arguments, return_dict=True)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        # Hugging Face's ForCausalLMLoss: position t predicts labels[t + 1]; the last has none.
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    from tokenforge.ops.linear_cross_entropy import linear_cross_entropy
    from tokenforge.ops.vocab_parallel_cross_entropy import vocab_parallel_linear_cross_entropy

    reduction = "sum" if num_items_in_batch is not None else "mean"
    softcap = getattr(self.config, "final_logit_softcapping", None) or 0.0
    targets = shift_labels.to(hidden.device).flatten()

    def fused_loss(hidden, weight, bias):
        h, weight = _matching_dtypes(hidden, weight)
        # Hugging Face's tensor parallelism ("colwise_gather_output"): a vocab-sharded DTensor head
        # and the same hidden on every rank -> each rank its vocab slice, no gathered weight.
        loss_fn = vocab_parallel_linear_cross_entropy if is_dtensor(weight) else linear_cross_entropy
        return loss_fn(h.flatten(0, -2), weight, targets, bias=bias.to(weight.dtype) if bias is not None else None,
                       ignore_index=ignore_index, reduction=reduction, softcap=float(softcap))

    count_call("linear_cross_entropy")
    loss = _head_loss(self.lm_head, hidden, fused_loss)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    aux = {}
    if spec.mlp == "moe":
        aux["aux_loss"] = None
        if router_logits_wanted and spec.aux_loss:  # after the normalisation, as the family adds it
            load_balancing_loss = sys.modules[type(self).__module__].load_balancing_loss_func
            aux["aux_loss"] = load_balancing_loss(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
                                                  arguments.get("attention_mask"))
            loss = loss + self.router_aux_loss_coef * aux["aux_loss"].to(loss.device)
    # Everything the base model returned (the cache under its name in this version, hidden states,
    # attentions, router logits) goes through; logits are None, and to_tuple() drops them as HF's own does.
    output_cls = MoeCausalLMOutputWithPast if spec.mlp == "moe" else CausalLMOutputWithPast
    fields = _field_names(output_cls)
    extra = {k: v for k, v in outputs.items() if k != "last_hidden_state" and k in fields}
    out = output_cls(loss=loss, logits=None, **aux, **extra)
    return out if return_dict else out.to_tuple()


def _check_hf_shape(model, spec: HFFamily) -> None:
    """Fail loudly (naming the version) when the classes no longer look like what we patch."""
    import transformers

    problems = []
    mlp_attrs = {"split": ("gate_proj", "up_proj", "down_proj", "act_fn"), "packed": ("gate_up_proj", "down_proj",
                 "activation_fn"), "moe": ()}[spec.mlp]
    if not hasattr(model, "model") or not hasattr(model.model, "layers") or not hasattr(model, "lm_head"):
        problems.append("model.model.layers / model.lm_head")
    else:
        for layer in model.model.layers[:1]:
            mlp = getattr(layer, "mlp", None)
            if mlp is None or not all(hasattr(mlp, n) for n in mlp_attrs):
                problems.append(f"layer.mlp.{{{','.join(mlp_attrs)}}}")
            norm = getattr(layer, "post_attention_layernorm", None)
            if norm is None or not hasattr(norm, "weight") or not (hasattr(norm, "variance_epsilon") or hasattr(norm, "eps")):
                problems.append("layer.post_attention_layernorm.weight/variance_epsilon")
    module = importlib.import_module(f"transformers.models.{spec.module}.modeling_{spec.module}")
    if spec.rope != "own" and not callable(getattr(module, "apply_rotary_pos_emb", None)):
        problems.append(f"modeling_{spec.module}.apply_rotary_pos_emb")
    if spec.aux_loss and not (callable(getattr(module, "load_balancing_loss_func", None))
                              and all(hasattr(model, a) for a in ("router_aux_loss_coef", "num_experts",
                                                                   "num_experts_per_tok"))):
        problems.append(f"modeling_{spec.module}.load_balancing_loss_func / the model's router_aux_loss_coef")
    if problems:
        raise RuntimeError(
            f"tokenforge.patch: transformers {transformers.__version__} changed the {spec.module} model classes "
            f"({', '.join(problems)} not found); tokenforge is tested with transformers{TRANSFORMERS_TESTED}. "
            "Install a tested version or use tokenforge.patch(model, ...) options that avoid these parts."
        )


def _patch_hf_mlps(model, spec: HFFamily, undo, report) -> None:
    mlps = [layer.mlp for layer in model.model.layers]
    act_attr = "act_fn" if spec.mlp == "split" else "activation_fn"
    activation = _activation_name(getattr(mlps[0], act_attr))
    if activation is None or (spec.mlp == "packed" and activation != "silu"):
        report.skipped.append(f"swiglu: {type(mlps[0]).__name__}.{act_attr} is {type(getattr(mlps[0], act_attr)).__name__}, "
                              "not SiLU or GELU (tanh or exact); its MLP left alone")
        return
    for mlp in mlps:
        if spec.mlp == "packed":
            undo.set_attr(mlp, "forward", types.MethodType(_hf_packed_mlp_forward, mlp))
        else:
            undo.set_attr(mlp, "_tokenforge_activation", activation)
            undo.set_attr(mlp, "forward", types.MethodType(_hf_mlp_forward, mlp))
    op = {"silu": "swiglu", "gelu_tanh": "geglu (tanh)", "gelu": "geglu"}[activation]
    kernel = "tokenforge.ops.swiglu_packed" if spec.mlp == "packed" else f"tokenforge.ops.{op.split()[0]}"
    report.patched.append(f"swiglu: {len(mlps)} {type(mlps[0]).__name__}.forward -> {kernel} ({op})")


def _patch_hf(model, family: str, undo, report, opts) -> None:
    spec = next(_HF_FAMILIES[c.__name__] for c in type(model).__mro__ if c.__name__ in _HF_FAMILIES)
    _check_hf_shape(model, spec)
    module_name = f"transformers.models.{spec.module}.modeling_{spec.module}"
    modeling = importlib.import_module(module_name)
    norm_cls = getattr(modeling, f"{type(model).__name__[: -len('ForCausalLM')]}RMSNorm")
    if opts["rms_norm"]:
        _replace_rms_norms(model, undo, report, (norm_cls,), lambda m: HFRMSNorm(m, spec.norm),
                           f"tokenforge.ops.rms_norm ({spec.norm} semantics)")
    if opts["swiglu"] and spec.mlp == "moe":
        report.skipped.append("swiglu: a mixture-of-experts family: its experts run as grouped GEMMs (moe); its "
                              "dense and shared-expert MLPs stay in torch")
    elif opts["swiglu"]:
        _patch_hf_mlps(model, spec, undo, report)
    if opts["rope"] and spec.rope == "own":
        report.skipped.append(f"rope: {module_name} rotates by its own rule, not Llama's; left alone")
    elif opts["rope"]:
        _patch_global(undo, module_name, "apply_rotary_pos_emb", {
            "interleaved": _hf_apply_rotary_pos_emb_interleaved, "half_width": _hf_apply_rotary_pos_emb_half_width,
        }.get(spec.rope, _hf_apply_rotary_pos_emb))
        report.patched.append(f"rope: {module_name}.apply_rotary_pos_emb -> tokenforge.ops.rope "
                              "(module-level: all models of this family while patched)")
    if opts["attention"]:
        _patch_hf_attention(model, modeling, undo, report)
    if opts["cross_entropy"]:
        undo.set_attr(model, "_tokenforge_original_forward", model.forward)
        undo.set_attr(model, "_tokenforge_forward_signature", inspect.signature(model.forward))
        undo.set_attr(model, "_tokenforge_family_spec", spec)
        undo.set_attr(model, "forward", types.MethodType(_with_signature_of(type(model).forward, _hf_causal_lm_forward), model))
        softcap = getattr(model.config, "final_logit_softcapping", None)
        report.patched.append(f"cross_entropy: {type(model).__name__}.forward loss -> tokenforge.ops.linear_cross_entropy "
                              "while training with labels (no logits then; eval mode returns logits)"
                              + (f", final logit softcap {softcap} fused" if softcap else "")
                              + ("; with output_router_logits, + the family's load-balancing loss" if spec.aux_loss
                                 else "")
                              + ("; the tensor-parallel lm_head by tokenforge.ops.vocab_parallel_linear_cross_entropy "
                                 "(each rank its vocab rows)" if is_dtensor(getattr(model.lm_head, "weight", None))
                                 else ""))
    _patch_hf_experts(model, undo, report, opts)


def _patch_hf_attention(model, modeling, undo, report) -> None:
    """"sdpa" or "eager" -> tokenforge's Hugging Face attention implementation (padded and packed
    batches on the varlen kernel); on a transformers without masking_utils, SDPA routing."""
    from tokenforge import hf_attention

    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        report.skipped.append(f"attention: the model uses attn_implementation={impl!r} (another fused kernel); load "
                              "it with attn_implementation='sdpa' to route attention to tokenforge")
        return
    if getattr(config, "output_attentions", False):
        report.skipped.append("attention: config.output_attentions is set, which needs the eager attention weights")
        return
    if not (hf_attention.available() and hasattr(modeling, "create_causal_mask")):
        if impl == "eager":
            report.skipped.append(f"attention: transformers {_transformers_version()} builds 4-D masks in the model; "
                                  "load it with attn_implementation='sdpa' to route its unmasked calls to tokenforge")
            return
        _use_sdpa_routing(undo)
        report.patched.append("attention: F.scaled_dot_product_attention -> tokenforge.ops.attention for the calls "
                              "it supports (fp16/bf16, causal or no mask; process-wide while patched)")
        return
    hf_attention.register()
    config._attn_implementation = hf_attention.NAME
    undo.steps.append(lambda: setattr(config, "_attn_implementation", impl))
    report.patched.append(f"attention: attn_implementation {impl!r} -> {hf_attention.NAME!r}: tokenforge.ops.attention, "
                          "left/right-padded batches (2-D mask) read in place by tokenforge.ops.attention."
                          "attention_padded, other masks and packed batches (position ids or cu_seq_lens) as "
                          "tokenforge.ops.attention_varlen documents")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# A patched Hugging Face *Experts module with this attribute runs its GEMMs by grouped_mm_float8 with that recipe.
_EXPERTS_FP8_ATTR = "_tokenforge_fp8_recipe"
# ... and this one holds its gate's form on the fused kernels (_experts_gate_form), False: its own _apply_gate.
_EXPERTS_FUSED_GATE_ATTR = "_tokenforge_fused_gate"


def _hf_default_apply_gate():
    """transformers' default ``_apply_gate`` (chunk into [gate | up], act(gate) * up), or None on a
    transformers without it."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return None
    return _default_apply_gate


def _fused_swiglu_gate(experts) -> bool:
    """Whether ``experts``' gate is plain SwiGLU on [gate | up] (the fused swiglu_packed kernel
    computes it): its class keeps transformers' default ``_apply_gate`` (or has none) and its
    activation is SiLU."""
    own = getattr(type(experts), "_apply_gate", None)
    return (own is None or own is _hf_default_apply_gate()) and getattr(experts, "is_concatenated", True) \
        and _is_silu(getattr(experts, "act_fn", nn.SiLU()))


def _experts_scalar(experts, names) -> Optional[float]:
    """The first of these attributes of ``experts`` that is a finite positive number, or None."""
    for name in names:
        v = getattr(experts, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            return float(v)
    return None


def _experts_gate_form(experts) -> Optional[dict]:
    """How the fused kernels compute ``experts``' gate, as keyword arguments of
    :func:`_fused_gate` (op plus its options), or None when only the class's own ``_apply_gate`` does.

    Plain SwiGLU for transformers' default gate with SiLU. A class with its own ``_apply_gate`` and a
    clamp limit (``limit`` / ``swiglu_limit``) gets the clamped form whose float64 output equals its
    ``_apply_gate``'s on a probe reaching well past the limit: DeepSeek-V4's clamped SwiGLU, or
    GPT-OSS's GLU with its ``alpha`` / ``swiglu_alpha``, each on halves or interleaved columns. No
    match (Bailing's clamp after the activation, a float32 gate, anything new): its own gate, in torch."""
    from tokenforge.ops.swiglu import gpt_oss_glu_reference, swiglu_packed_reference

    if _fused_swiglu_gate(experts):
        return {"op": "swiglu_packed"}
    own = getattr(type(experts), "_apply_gate", None)
    limit = _experts_scalar(experts, ("limit", "swiglu_limit"))
    if own is None or limit is None:
        return None
    alpha = _experts_scalar(experts, ("alpha", "swiglu_alpha"))
    probe = torch.randn(16, 2 * 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * (2 * limit)
    try:
        with torch.no_grad():
            want = own(experts, probe)
    except Exception:  # a gate that cannot run on a float64 CPU probe is left as it is
        return None
    candidates = []
    for interleaved in (False, True):
        candidates.append(({"op": "swiglu_packed", "limit": limit, "interleaved": interleaved},
                           swiglu_packed_reference(probe, limit=limit, interleaved=interleaved)))
        if alpha is not None:
            candidates.append(({"op": "gpt_oss_glu", "alpha": alpha, "limit": limit, "interleaved": interleaved},
                               gpt_oss_glu_reference(probe, alpha, limit, interleaved)))
    for form, got in candidates:
        if isinstance(want, torch.Tensor) and want.shape == got.shape and want.dtype == got.dtype \
                and torch.allclose(want, got, rtol=1e-12, atol=1e-12):
            return form
    return None


def _fused_gate(h: torch.Tensor, op: str, **options) -> torch.Tensor:
    """The gate of a form from :func:`_experts_gate_form` on the packed grouped-GEMM output h."""
    from tokenforge.ops.swiglu import gpt_oss_glu, swiglu_packed

    return (gpt_oss_glu if op == "gpt_oss_glu" else swiglu_packed)(h, **options)


def _hf_experts_forward(self, hidden_states, top_k_index=None, top_k_weights=None, *, router_indices=None,
                        routing_weights=None):
    """A Hugging Face ``*Experts`` module as two grouped GEMMs (one per projection, every expert at
    once) instead of a Python loop over experts, with what transformers' ``use_experts_implementation``
    flags say it has, as its own grouped_mm path reads them: weights (E, out, in), or (E, in, out)
    when ``is_transposed``; per-expert biases (``has_bias``: each row's added by its expert, found
    from offs with no host sync); a gate (``has_gate``: the fused SwiGLU kernel, or the class's own
    ``_apply_gate``) or a plain activation (``up_proj``, ``act_fn``); a ``post_expert_norm``
    (``has_post_expert_norm``). top_k_index / top_k_weights (T, k) are the router's choice and
    weights (GPT-OSS names them router_indices / routing_weights); an index equal to num_experts (a
    slot for an expert on another rank) contributes nothing, as there."""
    from tokenforge.fp8.grouped import expert_gemm
    from tokenforge.ops import moe_permute, moe_unpermute

    index = top_k_index if top_k_index is not None else router_indices
    weights = top_k_weights if top_k_weights is not None else routing_weights
    has_gate, has_bias = getattr(self, "has_gate", True), getattr(self, "has_bias", False)
    up = self.gate_up_proj if has_gate else self.up_proj
    n = up.shape[0]
    local = index < n
    xs, offs, order, _ = moe_permute(hidden_states, index.clamp(max=n - 1), n)
    expert_of_row = None
    if has_bias:
        rows = torch.arange(xs.shape[0], device=offs.device, dtype=offs.dtype)
        expert_of_row = torch.searchsorted(offs, rows, right=True)
    expert_mm = expert_gemm(vars(self).get(_EXPERTS_FP8_ATTR))  # the recipe is set by patch(fp8=...)
    transposed = getattr(self, "is_transposed", False)

    def project(x, weight, bias_name):
        y = expert_mm(x, weight if transposed else weight.transpose(1, 2), offs, check_offs=False)
        return y if expert_of_row is None else y + getattr(self, bias_name)[expert_of_row]

    if has_gate:
        h = project(xs, up, "gate_up_proj_bias")
        form = vars(self).get(_EXPERTS_FUSED_GATE_ATTR)  # decided by patch(); probed here for a bare call
        form = _experts_gate_form(self) if form is None else form
        h = _fused_gate(h, **form) if form else self._apply_gate(h)
    else:
        h = self.act_fn(project(xs, up, "up_proj_bias"))
    ys = project(h, self.down_proj, "down_proj_bias")
    if getattr(self, "has_post_expert_norm", False):
        ys = self.post_expert_norm(ys)
    count_call("grouped_mm")
    return moe_unpermute(ys, order, weights * local).to(hidden_states.dtype)


@functools.lru_cache(maxsize=None)
def _experts_dispatch_code():
    """The code of the forward transformers' ``use_experts_implementation`` gives an experts class
    (it dispatches on config._experts_implementation), or None on a transformers without it."""
    try:
        from transformers.integrations.moe import use_experts_implementation
    except ImportError:
        return None

    class Probe(nn.Module):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    return use_experts_implementation(Probe).forward.__code__


def _hf_experts_unsupported(m) -> Optional[str]:
    """Why _hf_experts_forward cannot run this transformers ``*Experts`` module, or None when it can:
    its weights must have the 3-D layout its flags name, a floating dtype, and the biases, gate or
    norm the flags say it has."""
    dispatch = _experts_dispatch_code()
    if dispatch is None or getattr(type(m).forward, "__code__", None) is not dispatch:
        # Only a class whose forward is transformers' experts dispatch computes what its flags say
        # (ErgoExperts, say, subclasses one and adds a per-route norm in its own forward).
        return "its forward is not transformers' use_experts_implementation dispatch"
    has_gate, has_bias = m.has_gate, m.has_bias
    up, down = getattr(m, "gate_up_proj" if has_gate else "up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3):
        return "no 3-D gate_up_proj (or up_proj) / down_proj expert weights"
    if getattr(m, "is_transposed", False):
        (e, d, width), (e2, inter, d2) = up.shape, down.shape
    else:
        (e, width, d), (e2, d2, inter) = up.shape, down.shape
    if not (e == e2 and d == d2 and width == (2 * inter if has_gate else inter)):
        return f"weights {tuple(up.shape)} / {tuple(down.shape)} are not the layout its flags name"
    if up.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"expert weights in {up.dtype}"
    if has_bias:
        wanted = {"gate_up_proj_bias" if has_gate else "up_proj_bias": (e, width), "down_proj_bias": (e, d)}
        if any(tuple(getattr(getattr(m, b, None), "shape", ())) != shape for b, shape in wanted.items()):
            return "its biases are not (experts, width)"
    if has_gate and not _fused_swiglu_gate(m) and not callable(getattr(m, "_apply_gate", None)):
        return "its activation is not SiLU and it has no _apply_gate"
    if not has_gate and not callable(getattr(m, "act_fn", None)):
        return "no act_fn"
    if getattr(m, "has_post_expert_norm", False) and not callable(getattr(m, "post_expert_norm", None)):
        return "has_post_expert_norm without a post_expert_norm module"
    return None


def _experts_description(m) -> str:
    """What runs around the grouped GEMMs of a patched ``*Experts`` module, for the report."""
    form = vars(m).get(_EXPERTS_FUSED_GATE_ATTR)
    if form:
        options = ", ".join(f"{k}={v}" for k, v in form.items() if k != "op")
        parts = [f"{form['op']}({options})" if options else form["op"]]
    else:
        parts = [f"its own {'_apply_gate' if getattr(m, 'has_gate', True) else 'act_fn'} in torch"]
    if getattr(m, "has_bias", False):
        parts.append("its expert biases")
    if getattr(m, "has_post_expert_norm", False):
        parts.append("its post-expert norm")
    return ", ".join(parts)


def _llama4_moe_forward(self, hidden_states):
    """Llama4TextMoe with each token sent to its top-k experts only, by two grouped GEMMs. Hugging
    Face's forward runs every token through every expert (one bmm over all E, the input scaled by a
    score that is 0 for the unselected experts): E / k times the expert FLOPs, 16x for Scout's
    16 experts top-1. The result is the same because a SwiGLU expert without biases maps a zero
    input to zero. As there, the top-k sigmoid score scales the expert's *input* (not its output),
    the slots are summed with weight 1, the shared expert is added, and the router logits are
    returned for the auxiliary loss."""
    from tokenforge.fp8.grouped import expert_gemm
    from tokenforge.ops import moe_permute, moe_unpermute
    from tokenforge.ops.swiglu import swiglu_packed

    x = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(x)  # (T, E): sigmoid of the top-k logits, 0 elsewhere
    # The router's own choice: its k positive scores are the top k (an unselected expert scores 0).
    scores, experts = router_scores.topk(self.top_k, dim=1)
    xs, offs, order, _ = moe_permute(x, experts, self.num_experts)
    xs = xs * scores.reshape(-1)[order].unsqueeze(1)  # in the model's dtype, as Hugging Face scales
    expert_mm = expert_gemm(vars(self).get(_EXPERTS_FP8_ATTR))  # the recipe is set by patch(fp8=...)
    gate_up = expert_mm(xs, self.experts.gate_up_proj, offs, check_offs=False)  # (E, D, 2I): [gate | up]
    ys = expert_mm(swiglu_packed(gate_up), self.experts.down_proj, offs, check_offs=False)
    count_call("grouped_mm")
    routed = moe_unpermute(ys, order, torch.ones_like(scores))
    return self.shared_expert(x) + routed.to(x.dtype), router_logits


def _is_llama4_moe(m) -> bool:
    """transformers' Llama4TextMoe with the layout and activation _llama4_moe_forward reads."""
    if type(m).__name__ != "Llama4TextMoe" or not type(m).__module__.startswith("transformers."):
        return False
    experts = getattr(m, "experts", None)
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3):
        return False
    (e, d, two_i), (e2, i, d2) = gu.shape, down.shape
    return (two_i == 2 * i and e == e2 == getattr(m, "num_experts", None) and d == d2 == getattr(m, "hidden_dim", None)
            and isinstance(getattr(m, "top_k", None), int) and callable(getattr(m, "router", None))
            and callable(getattr(m, "shared_expert", None)) and _is_silu(getattr(experts, "act_fn", None))
            and gu.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _patch_hf_experts(model, undo, report, opts) -> None:
    """Every transformers ``*Experts`` module _hf_experts_forward can run (3-D expert weights; its
    flags say the layout, biases, gate and norm) gets it; Llama 4's MoE block (whose experts see
    every token) a top-k grouped forward; other expert modules are reported by class name with the
    reason."""
    if not opts.get("moe", True):
        return
    patched, left, covered, described = {}, {}, set(), {}
    for m in model.modules():
        cls = type(m)
        if _is_llama4_moe(m):
            undo.set_attr(m, "forward", types.MethodType(_llama4_moe_forward, m))
            patched[cls.__name__] = patched.get(cls.__name__, 0) + 1
            covered.add(id(m.experts))
            continue
        if id(m) in covered or not (cls.__name__.endswith("Experts") and cls.__module__.startswith("transformers.")):
            continue
        why = _hf_experts_unsupported(m)
        if why is not None:
            left[cls.__name__] = why
            continue
        undo.set_attr(m, _EXPERTS_FUSED_GATE_ATTR, m.has_gate and (_experts_gate_form(m) or False))
        undo.set_attr(m, "forward", types.MethodType(_hf_experts_forward, m))
        patched[cls.__name__] = patched.get(cls.__name__, 0) + 1
        described[cls.__name__] = _experts_description(m)
    for name, count in patched.items():
        if name == "Llama4TextMoe":
            report.patched.append(f"moe: {count} {name}: every token through every expert (bmm) -> its top-k experts "
                                  "only by tokenforge.ops.grouped_mm (+ swiglu_packed, the moe_permute / moe_unpermute "
                                  "kernels)")
            continue
        report.patched.append(f"moe: {count} {name}: loop over experts -> tokenforge.ops.grouped_mm "
                              f"(+ {described[name]}, the moe_permute / moe_unpermute kernels)")
    for name, why in left.items():
        report.skipped.append(f"moe: {name} left alone: {why}")


def _patch_generic(model, undo, report, opts) -> None:
    from tokenforge.nn.rms_norm import RMSNorm

    report.skipped.append(f"{type(model).__name__} is not an architecture tokenforge knows: applied the generic patch "
                          "(torch.nn.RMSNorm modules, SDPA calls; rope, swiglu and cross_entropy need a known architecture)")
    if opts["rms_norm"]:
        _replace_rms_norms(model, undo, report, (nn.RMSNorm,), RMSNorm.from_torch)
    if opts["attention"]:
        if getattr(getattr(model, "config", None), "model_type", None) in _HF_MOE_ATTENTION:
            _patch_hf_attention(model, importlib.import_module(type(model).__module__), undo, report)
        else:
            _use_sdpa_routing(undo)
            report.patched.append("attention: F.scaled_dot_product_attention -> tokenforge.ops.attention for the "
                                  "calls it supports (fp16/bf16, causal or no mask; process-wide while patched)")
    _patch_hf_experts(model, undo, report, opts)


def _convert_fp8(model: nn.Module, undo: _Undo, report: PatchReport, recipe="tensorwise") -> None:
    """Eligible nn.Linear -> Float8Linear (``recipe``: a name or a Float8LinearConfig), undone
    module by module."""
    from tokenforge.fp8.convert import convert_to_float8

    before = dict(model.named_modules())
    conversion = convert_to_float8(model, recipe)
    for fqn in conversion.converted:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = before[fqn]
        undo.steps.append(lambda parent=parent, child=child, original=original: setattr(parent, child, original))
    for fqn in conversion.experts:
        undo.steps.append(lambda moe=model.get_submodule(fqn): setattr(moe, "fp8", None))
    _hf_experts_fp8(model, undo, report, conversion.recipe)
    if conversion.experts:
        others = f", {len(conversion.expert_notes)} of them rowwise (widths)" if conversion.expert_notes else ""
        report.patched.append(f"fp8: {len(conversion.experts)} MoE layers' expert GEMMs -> "
                              f"tokenforge.fp8.grouped_mm_float8 ({conversion.expert_recipe}{others}); routers kept "
                              "in high precision")
    if conversion.converted:
        report.patched.append(f"fp8: {len(conversion.converted)} nn.Linear -> tokenforge.fp8.Float8Linear "
                              f"({conversion.recipe}); {len(conversion.skipped)} kept in high precision")
        _emit_fp8_inputs(model, undo, report)
    elif not conversion.experts:
        report.skipped.append("fp8: no eligible nn.Linear (in/out features multiples of 16, not the head or the first layer)")


def _hf_experts_fp8(model: nn.Module, undo: _Undo, report: PatchReport, linear_recipe: str) -> None:
    """Hugging Face *Experts modules already on the grouped path run it in fp8
    (tokenforge.fp8.grouped_mm_float8) where hidden and expert widths are multiples of 16."""
    from tokenforge.fp8.grouped import expert_recipe_for, fit_expert_recipe

    asked = expert_recipe_for(linear_recipe)
    done = {}
    left = {}
    for m in model.modules():
        forward = getattr(getattr(m, "forward", None), "__func__", None)
        if forward is _hf_experts_forward:
            down = m.down_proj
        elif forward is _llama4_moe_forward:
            down = m.experts.down_proj.transpose(1, 2)
        else:
            continue
        # down_proj is (E, hidden, expert width), or (E, width, hidden) when transposed
        hidden, inter = down.shape[1:] if not getattr(m, "is_transposed", False) else down.shape[:0:-1]
        if hidden % 16 or inter % 16:
            left[type(m).__name__] = f"hidden {hidden} / expert width {inter} not multiples of 16"
            continue
        recipe = fit_expert_recipe(asked, hidden, inter)
        undo.set_attr(m, _EXPERTS_FP8_ATTR, recipe)
        done[recipe] = done.get(recipe, 0) + 1
    for recipe, count in done.items():
        why = "" if recipe == asked else " (widths not multiples of 128)"
        report.patched.append(f"fp8: {count} expert modules' grouped GEMMs -> tokenforge.fp8.grouped_mm_float8 "
                              f"({recipe}{why}); routers kept in high precision")
    for name, why in left.items():
        report.skipped.append(f"fp8: {name} experts stay in high precision: {why}")


def _emit_fp8_inputs(model: nn.Module, undo: _Undo, report: PatchReport) -> None:
    """The reference Transformer's norms and SwiGLU emit their outputs in fp8 for the Float8Linear
    layers they feed (tokenforge.fp8.emit: the activation is not read again to quantize it), where
    every consumer takes the same emittable input cast (rowwise / blockwise recipes)."""
    from tokenforge.fp8.emit import emit_cast_for
    from tokenforge.fp8.linear import Float8Linear
    from tokenforge.models.transformer import Block, FeedForward
    from tokenforge.nn.rms_norm import RMSNorm

    def cast_of(layers):
        if not all(isinstance(m, Float8Linear) for m in layers):
            return None
        found = {emit_cast_for(m.config.casts(), m.config.round_scales_to_power_of_2) for m in layers}
        return found.pop() if len(found) == 1 else None

    sites = 0
    for block in (m for m in model.modules() if isinstance(m, Block)):
        attn, ffn = block.attention, block.feed_forward
        dense = isinstance(ffn, FeedForward)  # an MoE layer's experts are not Float8Linear
        pairs = [(block.attention_norm, (attn.wq, attn.wk, attn.wv))] + ([(block.ffn_norm, (ffn.w1, ffn.w3))] if dense else [])
        for norm, consumers in pairs:
            cast = cast_of(consumers)
            if cast is not None and isinstance(norm, RMSNorm):
                undo.set_attr(norm, "fp8_emit", cast)
                sites += 1
        cast = cast_of((ffn.w2,)) if dense else None
        if cast is not None and ffn.swiglu_fn is _swiglu:
            undo.set_attr(ffn, "swiglu_fn", functools.partial(_swiglu, fp8=cast))
            sites += 1
    if sites:
        report.patched.append(f"fp8: {sites} RMSNorm/SwiGLU outputs emitted in fp8 for the Float8Linear they feed "
                              "(no re-read to quantize)")
    elif any(isinstance(m, Block) for m in model.modules()):
        report.skipped.append("fp8: norms and SwiGLU do not emit fp8 (the recipe's input cast is tensorwise or "
                              "their consumers differ; rowwise/blockwise recipes do)")


def _fused_optimizer(optimizer, report: PatchReport):
    """tokenforge.optim.AdamW with ``optimizer``'s param groups, hyper-parameters and state."""
    from tokenforge.optim import AdamW

    if type(optimizer) is not torch.optim.AdamW:
        report.skipped.append(f"optimizer: {type(optimizer).__name__} has no tokenforge equivalent "
                              "(torch.optim.AdamW does); keep using it")
        return optimizer
    known = ("params", "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
    groups = [{k: v for k, v in g.items() if k in known} for g in optimizer.param_groups]
    fused = AdamW(groups)
    fused.load_state_dict(optimizer.state_dict())
    report.patched.append("optimizer: torch.optim.AdamW -> tokenforge.optim.AdamW (same groups and state; "
                          "use report.optimizer from now on)")
    return fused


# Wrappers patch() looks through to the model they hold: PEFT's PeftModel (LoRA and the other
# adapters: its forward calls the wrapped model's), and DistributedDataParallel / DataParallel /
# FSDP1's ``.module``.
_MODULE_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def _unwrap(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The model the wrappers around ``model`` hold, and the wrappers' class names, outermost first."""
    wrappers = []
    while True:
        cls = type(model)
        if cls.__module__.split(".")[0] == "peft" and callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        elif cls.__name__ in _MODULE_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            inner = model.module
        else:
            return model, wrappers
        wrappers.append(cls.__name__)
        model = inner


def _family(model: nn.Module) -> str:
    from tokenforge.models.transformer import Transformer

    if isinstance(model, Transformer):
        return "tokenforge"
    for cls in type(model).__mro__:
        if cls.__name__ in _HF_FAMILIES and cls.__module__.startswith("transformers."):
            return _HF_FAMILIES[cls.__name__].module
    return "generic"


def patch(model: nn.Module, *, attention: bool = True, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
          cross_entropy: bool = True, moe: bool = True, fp8=False, optimizer=None) -> PatchReport:
    """Swap tokenforge's kernels into ``model`` in place (same parameters and state_dict keys) and
    return a report of what was patched and what was skipped, and why. ``fp8``: False, True (the
    tensorwise recipe), a recipe name in tokenforge.fp8.RECIPES or a Float8LinearConfig. A PEFT model
    (LoRA...) or a DDP / DataParallel / FSDP1 wrapper is patched through to the model it holds;
    ``unpatch`` takes the same object."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tokenforge.patch expects an nn.Module, got {type(model).__name__}")
    inner, wrappers = _unwrap(model)
    for held in dict.fromkeys((model, inner)):
        if _own(held, "_tokenforge_auto_patched"):
            # Patched by `tokenforge run` when it was built (a wrapper such as PEFT's may have come
            # after): the script's own call, with its options, wins.
            unpatch(held)
            object.__delattr__(held, "_tokenforge_auto_patched")
    if _own(model, _UNDO_ATTR) is not None:
        raise RuntimeError("tokenforge.patch: this model is already patched; call tokenforge.unpatch(model) first")
    if wrappers and _own(inner, _UNDO_ATTR) is not None:
        raise RuntimeError(f"tokenforge.patch: the {type(inner).__name__} inside this {wrappers[0]} is already "
                           "patched; call tokenforge.unpatch on it first")
    opts = dict(attention=attention, rms_norm=rms_norm, rope=rope, swiglu=swiglu, cross_entropy=cross_entropy, moe=moe)
    family = _family(inner)
    report = PatchReport(model=" > ".join(wrappers + [type(inner).__name__]), family=family)
    undo = _Undo()
    try:
        if family == "tokenforge":
            _patch_tokenforge_transformer(inner, undo, report, opts)
        elif family == "generic":
            _patch_generic(inner, undo, report, opts)
        else:
            _patch_hf(inner, family, undo, report, opts)
        if fp8 is not False and fp8 is not None:
            _convert_fp8(inner, undo, report, "tensorwise" if fp8 is True else fp8)
        if optimizer is not None:
            report.optimizer = _fused_optimizer(optimizer, report)
    except BaseException:
        undo.run()
        raise
    object.__setattr__(model, _UNDO_ATTR, undo)
    return report


def unpatch(model: nn.Module) -> None:
    """Undo ``tokenforge.patch(model)``: every module, function and forward goes back as it was."""
    undo = _own(model, _UNDO_ATTR)
    if undo is None:
        inner, _ = _unwrap(model)
        if inner is not model and _own(inner, _UNDO_ATTR) is not None:
            return unpatch(inner)  # patched before a wrapper came (`tokenforge run` patches models as built)
        raise RuntimeError("tokenforge.unpatch: this model was not patched by tokenforge.patch")
    undo.run()
    object.__delattr__(model, _UNDO_ATTR)
