"""tokenforge.patch on tiny, randomly initialised Hugging Face causal LMs (built from a config, no
download): same loss and gradients as the unpatched model, and unpatch restores it exactly."""

import os
import sys

import pytest
import torch

import tokenforge
from tokenforge.patch import HFRMSNorm, _hf_apply_rotary_pos_emb
from tokenforge.testing import rel_error

transformers = pytest.importorskip("transformers")

# fp32 everywhere; two layers of kernels vs PyTorch compound to ~1e-6.
TOL = 1e-5


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma", "gemma2", "gemma3", "smollm3",
            "ministral", "ministral3", "seed_oss", "helium", "olmo3", "exaone4"]


def _config(family):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    t = transformers
    if family == "llama":
        return t.LlamaConfig(**common), t.LlamaForCausalLM
    if family == "mistral":
        return t.MistralConfig(**common, sliding_window=None), t.MistralForCausalLM
    if family == "qwen2":
        return t.Qwen2Config(**common), t.Qwen2ForCausalLM
    if family == "qwen3":  # q/k norms on the head dim
        return t.Qwen3Config(**common, head_dim=16), t.Qwen3ForCausalLM
    if family == "phi3":  # packed gate_up_proj, partial rotary (half the head dim rotated)
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        return t.Phi3Config(**common, rope_parameters=rope, pad_token_id=0), t.Phi3ForCausalLM
    if family == "olmo2":  # (weight * x_hat).to(dtype), q/k norms over all heads, post-norms
        return t.Olmo2Config(**common, pad_token_id=0), t.Olmo2ForCausalLM
    if family == "gemma":  # (1 + weight) norms, GeGLU (tanh)
        return t.GemmaConfig(**common, head_dim=16, hidden_act="gelu_pytorch_tanh"), t.GemmaForCausalLM
    if family == "gemma2":  # + final logit softcap (fused into the loss), attention softcap (eager)
        return (t.Gemma2Config(**common, head_dim=16, final_logit_softcapping=3.0, sliding_window=8),
                t.Gemma2ForCausalLM)
    if family == "gemma3":
        return (t.Gemma3TextConfig(**common, head_dim=16, final_logit_softcapping=3.0, sliding_window=8),
                t.Gemma3ForCausalLM)
    if family == "smollm3":  # no rotary in every 2nd layer (NoPE)
        return t.SmolLM3Config(**common, no_rope_layer_interval=2, pad_token_id=0), t.SmolLM3ForCausalLM
    if family == "ministral":  # sliding window on some layers
        return t.MinistralConfig(**common, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]), \
            t.MinistralForCausalLM
    if family == "ministral3":
        return t.Ministral3Config(**common), t.Ministral3ForCausalLM
    if family == "seed_oss":  # biased q/k/v projections; dropout after attention and the MLP (0.1)
        # (attention dropout off: tokenforge's kernel draws its own mask, tests/test_attention_dropout.py)
        return t.SeedOssConfig(**common, head_dim=16, attention_bias=True, attention_dropout=0.0), t.SeedOssForCausalLM
    if family == "helium":  # (weight.float() * x_hat).to(dtype), interleaved rotary pairs
        return t.HeliumConfig(**common, head_dim=16), t.HeliumForCausalLM
    if family == "olmo3":  # OLMo2's norms and post-norms, sliding windows
        return t.Olmo3Config(**common, pad_token_id=0, sliding_window=8), t.Olmo3ForCausalLM
    # exaone4: q/k norms, post-norms, sliding windows
    return t.Exaone4Config(**common, sliding_window=8, sliding_window_pattern=2), t.Exaone4ForCausalLM


def _build(family):
    cfg, cls = _config(family)
    cfg._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).float()
    with torch.no_grad():  # norms away from their init (Gemma's are zeros), so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks for both runs (Seed-OSS's residual dropout)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_patched_matches_unpatched(family):
    model = _build(family)
    ids = torch.randint(0, 256, (2, 19))
    labels = ids.clone()
    labels[1, :4] = -100
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels)
    keys = list(model.state_dict())

    report = tokenforge.patch(model)
    assert report.family == family
    patched = " ".join(report.patched)
    for what in ("rms_norm", "swiglu", "rope", "cross_entropy"):
        assert what in patched, str(report)
    norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())
    assert all(isinstance(m, HFRMSNorm) for m in model.modules() if type(m).__name__.endswith("RMSNorm")), str(report)
    assert f"rms_norm: {norms} " in patched  # q/k norms included
    assert list(model.state_dict()) == keys
    loss, grads = _loss_and_grads(model, ids, labels)
    assert rel_error(loss, ref_loss) <= TOL
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel_error(grads[name], ref_grads[name]) <= TOL, name
    # Without labels the model still returns logits, as before.
    assert model(input_ids=ids).logits.shape == (2, 19, 256)

    tokenforge.unpatch(model)
    modeling = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["x"])
    assert modeling.apply_rotary_pos_emb is not _hf_apply_rotary_pos_emb
    assert "forward" not in vars(model) and "forward" not in vars(model.model.layers[0].mlp)
    assert type(model.model.norm).__name__.endswith("RMSNorm") and not isinstance(model.model.norm, HFRMSNorm)
    loss, grads = _loss_and_grads(model, ids, labels)
    assert torch.equal(loss, ref_loss)


def test_rotary_patch_is_reference_counted():
    a, b = _build("llama"), _build("llama")
    modeling = transformers.models.llama.modeling_llama
    original = modeling.apply_rotary_pos_emb
    tokenforge.patch(a)
    tokenforge.patch(b)
    tokenforge.unpatch(a)
    assert modeling.apply_rotary_pos_emb is _hf_apply_rotary_pos_emb  # b still patched
    tokenforge.unpatch(b)
    assert modeling.apply_rotary_pos_emb is original


def test_changed_model_classes_fail_loudly():
    model = _build("llama")
    del model.model.layers[0].mlp.act_fn
    with pytest.raises(RuntimeError, match=f"transformers {transformers.__version__} changed"):
        tokenforge.patch(model)
    assert "forward" not in vars(model)  # nothing left half-patched


def test_hf_bf16_attention_is_routed_to_the_kernel(monkeypatch):
    """In bf16 every layer's attention (causal, no mask) reaches tokenforge's kernels through the
    Hugging Face attention implementation tokenforge registers (tests/test_hf_attention.py covers
    padded and packed batches), SDPA left alone: with autograd the attention kernel; without it, 16
    queries x a GQA group of 2 fit one tile of the decoding kernel, which takes them."""
    from tokenforge import sdpa_patch
    from tokenforge.kernels import attention_kvcache as decode_kernels
    from tokenforge.ops.attention import LAUNCHERS

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"  # head_dim 32: the smallest the attention kernel takes
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 16))
    launches = []
    for module, fn in ((LAUNCHERS["triton"], "attention_forward"), (decode_kernels, "attention_decode")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _fn=fn, _real=real, **kw: launches.append(_fn) or _real(*a, **kw))
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss.float()
    launches.clear()
    tokenforge.patch(model)
    try:
        assert not sdpa_patch.is_installed()
        loss = model(input_ids=ids, labels=ids).loss.float()
        loss.backward()
        trained, launches[:] = list(launches), []
        with torch.no_grad():
            evaluated = model(input_ids=ids, labels=ids).loss.float()
    finally:
        tokenforge.unpatch(model)
    layers = model.config.num_hidden_layers
    assert trained == ["attention_forward"] * layers and launches == ["attention_decode"] * layers, (trained, launches)
    assert model.config._attn_implementation == "sdpa"
    # bf16 activations through two layers: the loss agrees to bf16 precision.
    for got in (loss, evaluated):
        assert abs(got.item() - ref.item()) <= 2e-2 * abs(ref.item())


def test_trainer_safe_outputs():
    """What Trainer and generate() read from the model comes back patched as unpatched: logits in
    eval mode, tuples with return_dict=False, the cache with use_cache, Trainer's num_items_in_batch
    and shift_labels; skip_logits (Liger's keyword) chooses explicitly."""
    model = _build("llama")
    ids = torch.randint(0, 256, (2, 11))
    labels = ids.clone()
    labels[0, :3] = -100
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels, use_cache=True)
    model.train()
    ref_train = model(input_ids=ids, labels=labels).loss.detach()
    ref_sum = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss.detach()
    shifted = torch.randint(0, 256, (2, 11))
    ref_shift = model(input_ids=ids, labels=labels, shift_labels=shifted).loss.detach()

    tokenforge.patch(model)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, use_cache=True)
        assert rel_error(out.loss, ref.loss) <= TOL and rel_error(out.logits, ref.logits) <= TOL
        assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 11
        fused = model(input_ids=ids, labels=labels, skip_logits=True)
        assert fused.logits is None and rel_error(fused.loss, ref.loss) <= TOL
        with pytest.raises(ValueError, match="skip_logits=True needs labels"):
            model(input_ids=ids, skip_logits=True)
    model.train()
    out = model(input_ids=ids, labels=labels, use_cache=True)
    assert out.logits is None and rel_error(out.loss, ref_train) <= TOL
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 11
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and rel_error(as_tuple[0], ref_train) <= TOL
    asked = model(input_ids=ids, labels=labels, skip_logits=False)
    assert asked.logits.shape == (2, 11, 256) and rel_error(asked.loss, ref_train) <= TOL
    # Trainer's gradient-accumulation normalisation: a sum over tokens divided by its count.
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7))
    assert rel_error(out.loss, ref_sum) <= TOL
    out = model(input_ids=ids, labels=labels, shift_labels=shifted)
    assert rel_error(out.loss, ref_shift) <= TOL
    # Positional arguments bind as the original forward's do.
    out = model(ids, None, None, None, None, labels)
    assert rel_error(out.loss, ref_train) <= TOL
    tokenforge.unpatch(model)


def test_checkout_kernels_folder_does_not_shadow_hf_kernels():
    """From the checkout, ``import kernels`` must not find its kernels/ folder (tokenforge.kernels):
    transformers 5.25+ imports Hugging Face's package of that name (tests/conftest.py drops the root)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not (spec.origin or "").startswith(os.path.join(root, "kernels")), spec.origin


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_on_a_patched_model_gives_the_unpatched_tokens(family):
    """generate() in a training run (evaluation samples, RL rollouts) on a patched model: greedy
    decoding with a KV cache, a left-padded batch and a single sequence, token for token as unpatched.
    fp32, so exact ties cannot flip a token: the patched RMSNorm, RoPE (at the cache's positions),
    MLP and loss modules run; SDPA keeps the fp32 attention (the kernel takes bf16/fp16)."""
    model = _build(family).eval()
    torch.manual_seed(3)
    ids = torch.randint(3, 256, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 left-padded
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        ref_single = model.generate(input_ids=ids[1:], **kw)
        tokenforge.patch(model)
        try:
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kw), ref)
            assert torch.equal(model.generate(input_ids=ids[1:], **kw), ref_single)
        finally:
            tokenforge.unpatch(model)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_patched_matches_unpatched(reentrant):
    """Trainer's gradient_checkpointing=True: every decoder layer's forward runs again in backward,
    through the patched norms, RoPE and MLP; the loss and every gradient as unpatched, both kinds of
    torch.utils.checkpoint."""
    model = _build("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(0, 256, (2, 13))
    ref_loss, ref_grads = _loss_and_grads(model, ids, ids)
    tokenforge.patch(model)
    try:
        loss, grads = _loss_and_grads(model, ids, ids)
    finally:
        tokenforge.unpatch(model)
    assert set(grads) == set(ref_grads)
    assert rel_error(loss, ref_loss) <= TOL
    for name in ref_grads:
        assert rel_error(grads[name], ref_grads[name]) <= TOL, name


def test_lora_model_patches_through_peft():
    """LoRA fine-tuning: tokenforge.patch on PEFT's wrapper patches the Llama inside (its LoRA'd
    projections still run their adapters through the patched MLP): the loss and every trainable
    (LoRA) gradient as unpatched, the fused loss head used, and unpatch on the wrapper restores it.
    A LoRA'd lm_head (an adapter added after patch, as under `tokenforge run`) makes the fused head
    step aside: the loss is the adapter's."""
    from peft import LoraConfig, get_peft_model

    counters = sys.modules["tokenforge.patch"].calls  # the module (tokenforge.patch is the function)
    base = _build("llama").train()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))
    ids = torch.randint(0, 256, (2, 13))
    ref_loss, ref_grads = _loss_and_grads(model, ids, ids)
    report = tokenforge.patch(model)
    assert report.family == "llama" and report.model == "PeftModelForCausalLM > LlamaForCausalLM" and len(report.patched) >= 4
    counters.clear()
    loss, grads = _loss_and_grads(model, ids, ids)
    assert counters.get("linear_cross_entropy") == 1 and counters.get("swiglu") == 2
    assert set(grads) == set(ref_grads) and all("lora_" in name for name in grads)
    assert rel_error(loss, ref_loss) <= TOL
    for name in ref_grads:
        assert rel_error(grads[name], ref_grads[name]) <= TOL, name
    with pytest.raises(RuntimeError, match="already patched"):
        tokenforge.patch(model)
    tokenforge.unpatch(model)
    again, _ = _loss_and_grads(model, ids, ids)
    assert torch.equal(again, ref_loss)

    # an adapter on lm_head after patching: the original head runs (the fused one reads a plain weight)
    base = _build("llama").train()
    tokenforge.patch(base)
    with_head = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False, target_modules=["lm_head"]))
    counters.clear()
    loss, _ = _loss_and_grads(with_head, ids, ids)
    assert "linear_cross_entropy" not in counters
    tokenforge.unpatch(with_head)  # through the wrapper to the model patched before it came
    assert rel_error(loss, _loss_and_grads(with_head, ids, ids)[0]) <= TOL
