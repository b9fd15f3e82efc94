"""The reference transformer: presets, parameter and FLOP counts, forward/loss paths, bad input."""

import pytest
import torch
import torch.nn.functional as F

from tokenforge.models import PRESETS, Transformer, TransformerConfig


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_counts_match_the_model(name):
    cfg = TransformerConfig.preset(name)
    with torch.device("meta"):  # shapes only: the 8b preset costs nothing
        model = Transformer(cfg)
    assert model.num_params() == cfg.num_params()
    assert model.num_params(include_embedding=False) == cfg.num_params(include_embedding=False)


def test_llama3_8b_shapes():
    cfg = TransformerConfig.preset("8b")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.ffn_dim, cfg.vocab_size) == (4096, 32, 32, 8, 14336, 128256)
    assert abs(cfg.num_params() / 8.03e9 - 1) < 0.01  # LLaMA-3-8B has 8.03B parameters


def test_flops_per_token_convention():
    cfg = TransformerConfig.preset("125m")
    n = cfg.num_params(include_embedding=False) + cfg.vocab_size * cfg.dim  # tied head still does a matmul
    assert cfg.flops_per_token(1024) == 6 * n + 12 * cfg.n_layers * cfg.dim * 1024


def test_forward_logits_and_loss_agree():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny"))
    idx = torch.randint(0, 256, (3, 20))
    targets = torch.randint(0, 256, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 256)
    loss = model(idx, targets)
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()), rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_causality():
    model = Transformer(TransformerConfig.preset("tiny"))
    idx = torch.randint(0, 256, (1, 12))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 256
    assert torch.allclose(model(idx)[:, :7], model(changed)[:, :7], atol=1e-6)


def test_tied_embeddings_share_storage_and_bf16_keeps_rope_tables_fp32():
    model = Transformer(TransformerConfig.preset("tiny", tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    model = model.to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32
    assert "rope_cos" not in model.state_dict()


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="unknown preset"):
        TransformerConfig.preset("70b")
    with pytest.raises(ValueError, match="unknown TransformerConfig field"):
        TransformerConfig.preset("tiny", width=3)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        TransformerConfig(dim=64, n_heads=4, n_kv_heads=3)
    model = Transformer(TransformerConfig.preset("tiny", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
