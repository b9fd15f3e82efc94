"""`tokenforge train`: trains, logs, checkpoints, resumes bit-exactly, compares variants.

All on the tiny preset with short sequences and a small slice of the stdlib corpus: the kernels
run under the Triton interpreter on CPU, so kernels-on runs are 2-3 steps.
"""

import builtins
import json
import math
import os

import pytest
import torch

from tokenforge import cli, train
from tokenforge.metrics import read_jsonl

SMALL = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--max-data-bytes", "400000",
         "--eval-iters", "1", "--progress", "none", "--lr", "3e-3"]


def _losses(out_dir):
    return [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl"))]


def test_trains_logs_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(SMALL + ["--kernels", "off", "--max-steps", "12", "--warmup-steps", "3", "--eval-every", "6", "--out", str(out),
                               "--json", str(tmp_path / "summary.json"), "--plot", str(tmp_path / "loss.png")]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "loss.png").exists() or "matplotlib is not installed" in text
    assert "tiny preset" in text and "stdlib" in text and "tokens/s" in text and "optimizer: tokenforge.optim.AdamW" in text
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert {"step", "loss", "tokens_per_s", "mfu", "peak_mem", "lr"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["peak_mem"] > 0
        assert r["mfu"] is None  # CPU: no peak to measure against
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    # It learns: byte-level loss starts near ln(256) = 5.5 and falls.
    assert rows[0]["loss"] == pytest.approx(math.log(256), abs=0.3)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    # Warmup then cosine: the lr rises to the peak, then decays to min_lr_ratio x lr.
    lrs = [r["lr"] for r in rows]
    assert lrs[0] < lrs[1] and max(lrs) == pytest.approx(3e-3) and lrs[-1] < lrs[2]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 12 and ckpt["sampler"]["position"] == 12
    assert {"model", "optimizer", "scheduler", "rng", "extra"} <= set(ckpt)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"][0]["variant"] == "eager" and len(summary["losses"]) == 12


def test_resume_is_bit_exact(tmp_path):
    args = SMALL + ["--kernels", "off", "--max-steps", "6", "--eval-every", "0", "--grad-accum", "2"]
    assert train.main(args + ["--out", str(tmp_path / "full")]) == 0
    assert train.main(args + ["--out", str(tmp_path / "cut"), "--stop-at", "3"]) == 0
    assert len(_losses(tmp_path / "cut")) == 3
    assert train.main(args + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert resumed == full  # exact float equality, step by step


def test_kernels_on_matches_plain_pytorch(tmp_path):
    args = SMALL + ["--max-steps", "2", "--eval-every", "0", "--batch-size", "2"]
    assert train.main(args + ["--kernels", "off", "--out", str(tmp_path / "off")]) == 0
    assert train.main(args + ["--kernels", "on", "--out", str(tmp_path / "on")]) == 0
    off, on = _losses(tmp_path / "off"), _losses(tmp_path / "on")
    # Same init, same batches; fp32 kernels vs torch reference differ only in rounding order.
    for (s1, a), (s2, b) in zip(off, on):
        assert s1 == s2 and abs(a - b) < 1e-4


def test_compare_table_and_json(tmp_path, capsys):
    path = tmp_path / "compare.json"
    assert train.main(SMALL + ["--compare", "--variants", "eager,kernels", "--max-steps", "2", "--batch-size", "2",
                               "--timing-warmup", "1", "--eval-every", "0", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "speedup" in text and "eager" in text and "kernels" in text
    d = json.loads(path.read_text())
    assert [r["variant"] for r in d["rows"]] == ["eager", "kernels"]
    eager, kernels = d["rows"]
    assert eager["speedup"] == pytest.approx(1.0) and kernels["tokens_per_s"] > 0
    assert kernels["max_loss_diff_vs_eager"] < 1e-4
    assert d["device_name"] == "cpu" and d["seq_len"] == 32 and d["preset"] == "tiny"


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # fp8 casts of masked lanes, interpreter
def test_config_file_fp8_and_progress_bar(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"preset": "tiny", "n_layers": 1, "dim": 32, "n_heads": 2, "n_kv_heads": 1,
                               "hidden_dim": 64}))
    assert train.main(SMALL + ["--config", str(cfg), "--kernels", "off", "--fp8", "--max-steps", "1",
                               "--eval-every", "0", "--batch-size", "2", "--progress", "bar"]) == 0
    text = capsys.readouterr().out
    assert "1 layers, dim 32" in text
    assert "fp8" in text  # either converted (CPU: emulated) or skipped with the reason


def test_optimizer_falls_back_to_torch(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tokenforge.optim":
            raise ImportError("simulated: not built")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    model = torch.nn.Linear(4, 4)
    opt, name = train.make_optimizer(model, 1e-3, 0.1)
    assert isinstance(opt, torch.optim.AdamW) and "tokenforge.optim unavailable" in name
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # matrices decay, biases don't


def test_sharded_params_need_dtensor_support():
    from tokenforge.optim import AdamW

    opt, name = train.make_optimizer(torch.nn.Linear(4, 4), 1e-3, 0.1, sharded=True)
    if getattr(AdamW, "SUPPORTS_DTENSOR", False):
        assert isinstance(opt, AdamW)
    else:
        assert isinstance(opt, torch.optim.AdamW) and "SUPPORTS_DTENSOR" in name


def test_lr_schedule_shape():
    f = train.lr_lambda(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_errors_say_what_to_do(tmp_path, capsys):
    assert train.main(SMALL + ["--max-steps", "1", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert train.main(SMALL + ["--max-steps", "1", "--data", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert train.main(SMALL + ["--max-steps", "1", "--dist", "ddp"]) == 2  # one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs torchrun's environment" in err[0], err


def test_cli_delegates_to_train_and_cost(capsys):
    # A SystemExit here (argparse refusing the subcommand) is a failure: the CLI is broken.
    rc = cli.main(["cost", "--params", "1B", "--mfu", "0.5"])
    assert rc == 0 and "GPU-hours" in capsys.readouterr().out
    assert cli.main(["train"] + SMALL + ["--kernels", "off", "--max-steps", "1", "--eval-every", "0"]) == 0
    assert "done: 1 steps" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile on CPU takes ~1 min per model; GPU only")
def test_compare_on_gpu_all_variants(tmp_path):
    # The GPU paths: bf16 autocast, pinned batches, MFU against the table's peak, compile, fp8.
    from tokenforge.cost import match_gpu

    path = tmp_path / "compare.json"
    assert train.main(["--preset", "tiny", "--seq-len", "128", "--batch-size", "8", "--compare", "--max-steps", "4",
                       "--timing-warmup", "2", "--eval-every", "0", "--eval-iters", "1", "--progress", "none",
                       "--max-data-bytes", "1000000", "--json", str(path)]) == 0
    d = json.loads(path.read_text())
    rows = d["rows"]
    assert {"eager", "compile", "kernels"} <= {r["variant"] for r in rows}
    known_gpu = match_gpu(d["device_name"]) is not None
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_mem"] > 0
        assert (r["mfu"] is not None) == known_gpu and (r["mfu"] is None or 0 < r["mfu"] < 1)
        assert r["max_loss_diff_vs_eager"] < 0.05  # bf16 autocast: kernels and compile round differently


@pytest.mark.slow
def test_e2e_bench_script(tmp_path):
    # bench/e2e_train.sh (joins bench/gpu_check.sh): compare JSON for cost --from-results, cost table.
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "E2E_STEPS": "2", "E2E_TIMING_WARMUP": "1"}
    if not torch.cuda.is_available():
        env["E2E_FIRST"] = "tiny:32:2"  # the interpreter runs the kernels: a small batch keeps it quick
    proc = subprocess.run(["bash", os.path.join(root, "bench", "e2e_train.sh")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads((tmp_path / "e2e.json").read_text())
    assert {r["variant"] for r in d["rows"]} >= {"eager", "kernels"}
    assert "1T" in proc.stdout and "$100K buys" in proc.stdout


@pytest.mark.parametrize("bad,words", [
    (["--batch-size", "0"], "--batch-size"), (["--max-steps", "-5"], "--max-steps"),
    (["--seq-len", "100000"], "--seq-len"), (["--seq-len", "1"], "--seq-len"), (["--lr", "0"], "--lr"),
    (["--grad-accum", "0"], "--grad-accum"), (["--val-fraction", "1.5"], "--val-fraction"),
    (["--compare", "--timing-warmup", "9", "--max-steps", "3"], "--timing-warmup"),
])
def test_cli_refuses_bad_values_with_one_line(bad, words, capsys):
    base = ["--preset", "tiny", "--eval-every", "0", "--progress", "none", "--max-data-bytes", "200000"]
    args = base + ["--max-steps", "2"] + bad if "--max-steps" not in bad else base + bad
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and err[0].startswith("tokenforge train:"), err


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--eval-iters", "1",
            "--progress", "none", "--max-data-bytes", "200000", "--out", out]
    assert train.main(base + ["--max-steps", "3"]) == 0
    capsys.readouterr()
    assert train.main(base + ["--max-steps", "2", "--resume"]) == 2
    assert "is at step 3" in capsys.readouterr().err


def test_extending_max_steps_on_resume_follows_one_lr_rule(tmp_path, capsys):
    """Resuming a 20-step run (default warmup 2) with --max-steps 40 (default warmup 4): the warmup
    stays 2 and every step from the first resumed one takes the 40-step cosine's LR for its step;
    nothing of the old schedule leaks into step 21. The same --max-steps resumes bit-exactly
    (test_resume_is_bit_exact)."""
    out = str(tmp_path / "run")
    base = SMALL + ["--kernels", "off", "--eval-every", "0", "--out", out, "--min-lr-ratio", "0.1",
                    "--seq-len", "16", "--batch-size", "2"]
    assert train.main(base + ["--max-steps", "20"]) == 0
    assert train.main(base + ["--max-steps", "40", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "warmup 2 kept, cosine now ends at step 40 (was 20)" in text
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 41))
    old, rule = train.lr_lambda(2, 20, 0.1), train.lr_lambda(2, 40, 0.1)
    for r in rows:
        schedule = old if r["step"] <= 20 else rule
        assert r["lr"] == pytest.approx(3e-3 * schedule(r["step"] - 1), rel=1e-12), r["step"]
    # A second extension keeps the rule (the checkpoint records the schedule it ran).
    assert train.main(base + ["--max-steps", "42", "--resume"]) == 0
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert rows[40]["lr"] == pytest.approx(3e-3 * train.lr_lambda(2, 42, 0.1)(40), rel=1e-12)


def test_corrupt_checkpoint_is_named_with_what_to_do(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--eval-iters", "1",
            "--progress", "none", "--max-data-bytes", "200000", "--out", str(out)]
    assert train.main(base + ["--max-steps", "2"]) == 0
    ckpt = out / "checkpoint.pt"
    assert (out / "checkpoint.pt.sha256").exists() and not list(out.glob("*.tmp*"))
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # an interrupted copy
    capsys.readouterr()
    assert train.main(base + ["--max-steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is corrupt" in err[0] and "SHA-256" in err[0], err
    (out / "checkpoint.pt.sha256").unlink()  # no checksum: the unpickling error is named the same way
    assert train.main(base + ["--max-steps", "4", "--resume"]) == 2
    assert "is corrupt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# --optimizer muon, --qk-clip, --target-loss (issue 15)
# ---------------------------------------------------------------------------------------------


def test_muon_trains_and_resumes_bit_exactly(tmp_path, capsys):
    args = SMALL + ["--kernels", "off", "--optimizer", "muon", "--max-steps", "6", "--eval-every", "0"]
    assert train.main(args + ["--out", str(tmp_path / "full")]) == 0
    text = capsys.readouterr().out
    assert "optimizer: tokenforge.optim.Muon (14 hidden matrices" in text
    assert train.main(args + ["--out", str(tmp_path / "cut"), "--stop-at", "3"]) == 0
    assert train.main(args + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert resumed == full
    assert full[-1][1] < full[0][1]


def test_qk_clip_records_per_step(tmp_path):
    out = tmp_path / "qk"
    assert train.main(SMALL + ["--kernels", "off", "--optimizer", "muon", "--qk-clip", "0.01", "--max-steps", "3",
                               "--eval-every", "0", "--out", str(out)]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    # a threshold under every logit clips every head of every layer at the first step; after it
    # the logits stay near the threshold (an optimizer step moves them a little either way)
    assert rows[0]["qk_clipped_heads"] == 2 * 4 and rows[0]["qk_max_logit"] > 0.05
    assert all(0 < r["qk_max_logit"] < 0.03 for r in rows[1:])


def test_target_loss_stops_and_prices_the_run(tmp_path, capsys):
    path = tmp_path / "run.json"
    assert train.main(SMALL + ["--kernels", "off", "--max-steps", "40", "--eval-every", "2", "--target-loss", "5.0",
                               "--gpu-price", "2.0", "--json", str(path), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    row = json.loads(path.read_text())["rows"][0]
    t = row["target"]
    assert t is not None and t["val_loss"] <= 5.0 and t["step"] % 2 == 0 and t["step"] < 40
    assert row["steps"] == t["step"] and t["tokens"] == t["step"] * 4 * 32
    assert t["gpu_hours"] == pytest.approx(t["train_seconds"] / 3600) and t["usd"] == pytest.approx(2.0 * t["gpu_hours"])
    assert f"reached at step {t['step']}" in text
    assert len(read_jsonl(tmp_path / "out" / "metrics.jsonl")) == t["step"]  # it stopped there


def test_target_loss_not_reached_says_so(tmp_path, capsys):
    assert train.main(SMALL + ["--kernels", "off", "--max-steps", "2", "--eval-every", "1", "--target-loss", "0.1"]) == 0
    assert "target val loss 0.1: not reached in 2 steps" in capsys.readouterr().out


def test_compare_holds_optimizers_side_by_side(tmp_path, capsys):
    path = tmp_path / "cmp.json"
    assert train.main(SMALL + ["--compare", "--variants", "eager+adamw,eager+muon", "--max-steps", "12",
                               "--eval-every", "2", "--timing-warmup", "1", "--target-loss", "5.2",
                               "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "tok->L" in text and "$->L" in text and "eager+muon" in text
    assert "tokenforge.optim.Muon" in text and "tokenforge.optim.AdamW" in text
    d = json.loads(path.read_text())
    adamw, muon = d["rows"]
    assert adamw["optimizer"].startswith("tokenforge.optim.AdamW") and muon["optimizer"].startswith("tokenforge.optim.Muon")
    assert d["target_loss"] == 5.2 and adamw["tokens_to_target_ratio"] == pytest.approx(1.0)
    if muon["target"] and adamw["target"]:
        assert muon["tokens_to_target_ratio"] == pytest.approx(muon["target"]["tokens"] / adamw["target"]["tokens"])


@pytest.mark.parametrize("bad,words", [
    (["--target-loss", "2.0", "--eval-every", "0"], "--eval-every"), (["--qk-clip", "-1"], "--qk-clip"),
    (["--target-loss", "nan", "--eval-every", "1"], "--target-loss"),
    (["--compare", "--variants", "eager+sgd"], "unknown variant"),
])
def test_optimizer_flags_refuse_bad_values(bad, words, capsys):
    base = ["--preset", "tiny", "--progress", "none", "--max-data-bytes", "200000", "--max-steps", "2",
            "--timing-warmup", "0"]
    assert train.main(base + bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_parse_variant_takes_the_optimizer_suffix():
    v = train.parse_variant("kernels+compile+muon")
    assert (v.kernels, v.compile, v.fp8, v.optimizer) == (True, True, False, "muon")
    assert train.parse_variant("fp8", "muon").optimizer == "muon"
    assert train.parse_variant("eager+adamw", "muon").optimizer == "adamw"


def test_kernels_muon_matches_torch_muon(tmp_path):
    """The Triton Newton-Schulz (interpreter) in a training step against the torch one: bf16
    iterations both, so the updates differ at bf16 rounding and the losses barely."""
    args = SMALL + ["--max-steps", "2", "--eval-every", "0", "--batch-size", "2", "--optimizer", "muon"]
    assert train.main(args + ["--kernels", "off", "--out", str(tmp_path / "off")]) == 0
    assert train.main(args + ["--kernels", "on", "--out", str(tmp_path / "on")]) == 0
    off, on = _losses(tmp_path / "off"), _losses(tmp_path / "on")
    for (s1, a), (s2, b) in zip(off, on):
        assert s1 == s2 and abs(a - b) < 1e-3 * abs(a)


def test_progress_line_shows_the_tables_median(tmp_path, capsys):
    """The last progress line's tokens/s is the summary's (the median over the timed steps), not
    one step's."""
    args = SMALL + ["--kernels", "off", "--max-steps", "6", "--eval-every", "0", "--progress", "plain",
                    "--log-every", "1", "--timing-warmup", "2", "--json", str(tmp_path / "s.json")]
    assert train.main(args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ") and "tok/s" in ln]
    assert "tok/s (untimed)" in lines[0] and "tok/s (median)" in lines[-1]
    shown = float(lines[-1].split("tok/s (median) ")[1].split()[0].rstrip(",").replace(",", ""))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert shown == round(summary["rows"][0]["tokens_per_s"])
