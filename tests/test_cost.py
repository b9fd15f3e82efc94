"""The cost model reproduces public training-cost anchors and its own arithmetic."""

import json

import pytest

from tokenforge import cost
from tokenforge.models.transformer import TransformerConfig


def _within(predicted: float, actual: float, tol: float = 0.20) -> bool:
    return abs(predicted - actual) / actual <= tol


def test_deepseek_v3_anchor():
    # DeepSeek-V3 technical report (arXiv 2412.19437): 671B total / 37B active parameters, 14.8T
    # tokens, 2.788M H800 GPU-hours for the full training (2.664M of them pre-training). H800 = the
    # H100 SXM's compute (989 TFLOP/s dense bf16). MFU 35% of the bf16 peak: they trained in FP8
    # with heavy expert-parallel all-to-all over the H800's cut-down NVLink; 3.3e24 6N-FLOPs in 2.66M
    # pre-training hours is ~35% of 989 TFLOP/s, the figure commonly derived from the report.
    # Attention term with the model dims: 61 layers, hidden 7168, sequence 4096 in pre-training.
    e = cost.estimate(37e9, 14.8e12, gpu="H800", mfu=0.35, n_layers=61, attn_dim=7168, seq_len=4096)
    assert _within(e.gpu_hours, 2.788e6), e.gpu_hours
    # The same without the attention term also lands inside the band.
    assert _within(cost.estimate(37e9, 14.8e12, gpu="H800", mfu=0.35).gpu_hours, 2.788e6)
    # At the report's $2/GPU-hour rental assumption: $5.576M.
    assert _within(e.dollars, 5.576e6)


def test_llama3_405b_anchor():
    # Llama 3 paper (arXiv 2407.21783): 405B dense, 15.6T tokens, 30.84M H100-80GB GPU-hours; their
    # Table 4 reports 38-43% bf16 MFU on 8-16K H100s -> 40%. Model: 126 layers, width 16384, seq 8192.
    e = cost.estimate(405e9, 15.6e12, gpu="H100", mfu=0.40, n_layers=126, attn_dim=16384, seq_len=8192)
    assert _within(e.gpu_hours, 30.84e6), e.gpu_hours
    # Their stated compute budget is 3.8e25 FLOPs; 6 N D alone gives 3.79e25.
    assert _within(cost.estimate(405e9, 15.6e12).flops, 3.8e25, 0.05)


def test_arithmetic_is_consistent():
    e = cost.estimate(1e9, gpu="H200", mfu=0.5, price=3.0, gpus=8)
    assert e.tokens == 20e9  # Chinchilla default
    assert e.flops == pytest.approx(6e9 * 20e9)
    assert e.gpu_hours == pytest.approx(e.flops / (989.4e12 * 0.5) / 3600)
    assert e.days == pytest.approx(e.gpu_hours / 8 / 24)
    assert e.dollars == pytest.approx(e.gpu_hours * 3.0)
    # What a budget buys inverts the cost.
    assert cost.tokens_for_budget(e.dollars, 1e9, gpu="H200", mfu=0.5, price=3.0) == pytest.approx(20e9)
    # Halving MFU doubles the hours; the fp8 peak (twice bf16) halves them.
    assert cost.estimate(1e9, mfu=0.25, gpu="H200").gpu_hours == pytest.approx(e.gpu_hours * 2)
    assert cost.estimate(1e9, mfu=0.5, gpu="H200", fp8_peak=True).gpu_hours == pytest.approx(e.gpu_hours / 2, rel=1e-3)


def test_gpu_table_and_names():
    assert cost.match_gpu("NVIDIA H100 80GB HBM3").name == "H100"
    assert cost.match_gpu("NVIDIA H100 PCIe").name == "H100-PCIE"
    assert cost.match_gpu("NVIDIA H200").name == "H200"
    assert cost.match_gpu("NVIDIA A100-SXM4-80GB").name == "A100"
    assert cost.match_gpu("NVIDIA B200").name == "B200"
    assert cost.match_gpu("cpu") is None
    assert cost.GPUS["A100"].fp8_flops is None
    for g in cost.GPUS.values():  # fp8 is exactly twice bf16 on every part that has it
        assert g.fp8_flops is None or g.fp8_flops == pytest.approx(2 * g.bf16_flops, rel=0.01)


def test_bad_inputs_say_what_to_do():
    with pytest.raises(ValueError, match="choose one of"):
        cost.estimate(1e9, gpu="V100")
    with pytest.raises(ValueError, match="fraction"):
        cost.estimate(1e9, mfu=40)
    with pytest.raises(ValueError, match="no fp8"):
        cost.estimate(1e9, gpu="A100", fp8_peak=True)


def test_preset_uses_model_flops(capsys):
    assert cost.main(["--preset", "1b", "--seq-len", "4096", "--json", "--mfu", "0.5"]) == 0
    d = json.loads(capsys.readouterr().out)
    cfg = TransformerConfig.preset("1b")
    assert d["flops_per_token"] == cfg.flops_per_token(4096)


def test_cli_text_and_budget(capsys):
    assert cost.main(["--params", "70B", "--gpu", "H100", "--mfu", "0.4", "--budget", "100K"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "buys" in out and "1.4T tokens" in out  # Chinchilla 20 x 70B


def test_seed_table_assumed_is_labelled(capsys):
    assert cost.main(["--seed-table"]) == 0
    out = capsys.readouterr().out
    assert "ASSUMED MFU" in out
    for size in ("1T", "500B", "250B", "100B"):
        assert size in out
    t = cost.seed_table()
    assert len(t["rows"]) == 8
    by = {(r["size"], r["kernels"]): r for r in t["rows"]}
    assert by[("1T", "on")]["dollars"] < by[("1T", "off")]["dollars"]
    assert by[("1T", "on")]["budget_tokens"] > by[("1T", "off")]["budget_tokens"]


def _results(tmp_path, rows, device="NVIDIA H200"):
    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"device_name": device, "preset": "1b", "seq_len": 4096, "rows": rows}))
    return str(path)


def test_from_results_uses_measured_mfu(tmp_path, capsys):
    path = _results(tmp_path, [{"variant": "eager", "mfu": 0.30}, {"variant": "compile", "mfu": 0.36},
                               {"variant": "kernels", "mfu": 0.48}])
    t = cost.seed_table(results=cost.load_results(path))
    assert "measured" in t["source"] and "H200" in t["source"]
    by = {(r["size"], r["kernels"]): r for r in t["rows"]}
    assert by[("1T", "off")]["mfu"] == 0.30 and by[("1T", "on")]["mfu"] == 0.48
    assert cost.main(["--params", "8B", "--from-results", path]) == 0
    out = capsys.readouterr().out
    assert "48.0%" in out and "measured" in out and "H200" in out  # the results' GPU is the default


def test_from_results_refuses_cpu_runs(tmp_path, capsys):
    path = _results(tmp_path, [{"variant": "eager", "mfu": None}], device="cpu")
    assert cost.main(["--params", "8B", "--from-results", path]) == 2
    assert "no measured MFU" in capsys.readouterr().err
    # The seed table falls back to the assumed MFUs, and says so.
    assert cost.main(["--seed-table", "--from-results", path]) == 0
    captured = capsys.readouterr()
    assert "no measured MFU" in captured.err and "ASSUMED MFU" in captured.out
