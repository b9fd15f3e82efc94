"""tokenforge.patch on tiny, randomly initialised Hugging Face causal LMs (built from a config, no
download): same loss and gradients as the unpatched model, and unpatch restores it exactly."""

import pytest
import torch

import tokenforge
from tokenforge.patch import HFRMSNorm, _hf_apply_rotary_pos_emb
from tokenforge.testing import rel_error

transformers = pytest.importorskip("transformers")

# fp32 everywhere; two layers of kernels vs PyTorch compound to ~1e-6.
TOL = 1e-5


def _config(family):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        return transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    return transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM


def _build(family):
    cfg, cls = _config(family)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(cfg).float()


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
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


def test_hf_bf16_attention_is_routed_to_the_kernel():
    """In bf16 the model's SDPA calls (causal, no mask) reach tokenforge's attention kernel."""
    from tokenforge import sdpa_patch

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"  # head_dim 32: the smallest the attention kernel takes
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss.float()
        tokenforge.patch(model)
        before = sdpa_patch.stats["routed"]
        loss = model(input_ids=ids, labels=ids).loss.float()
        routed = sdpa_patch.stats["routed"] - before
        tokenforge.unpatch(model)
    assert routed == model.config.num_hidden_layers, f"{routed} SDPA calls routed"
    assert not sdpa_patch.is_installed()
    # bf16 activations through two layers: the loss agrees to bf16 precision.
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())
