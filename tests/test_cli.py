"""`tokenforge info` tells the truth about versions, the GPU, the extension and each op's backend."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tokenforge import backends
from tokenforge.cli import collect_info, main


def test_info_json_matches_reality():
    info = collect_info()
    assert info["versions"]["torch"] == torch.__version__
    assert len(info["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    ext_importable = importlib.util.find_spec("tokenforge._C") is not None
    assert info["extension"]["available"] == ext_importable
    if not ext_importable:
        assert info["extension"]["reason"], "an absent extension must say why"
    rows = {(r["op"], r["device"]): r for r in info["ops"]}
    cpu = rows[("rms_norm", "cpu")]
    x = torch.empty(2, 64)
    assert cpu["backend"] == backends.choose("rms_norm", x, torch.empty(64))
    assert cpu["why"]
    # The extension never runs CPU tensors, and info says why.
    assert "cuda" in cpu["unavailable"]


def test_info_text_and_json_commands(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "tokenforge" in text and "rms_norm" in text and "CUDA extension" in text
    assert main(["info", "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert {"versions", "gpus", "extension", "ops"} <= set(parsed)


def test_python_dash_m_and_console_script():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "tokenforge", "info"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "rms_norm" in out.stdout
    script = shutil.which("tokenforge", path=os.path.dirname(sys.executable))
    if script:  # installed as a console script by pip
        out = subprocess.run([script, "info", "--json"], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        json.loads(out.stdout)


def test_info_reports_a_forced_backend_that_cannot_run(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    info = collect_info()
    cpu = [r for r in info["ops"] if r["device"] == "cpu" and r["op"] == "rms_norm"][0]
    assert cpu["backend"] == "error" and "cuda" in cpu["why"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; a GPU tunes for real")
def test_tune_attention_without_a_gpu_says_so_in_one_line(capsys):
    assert main(["tune", "attention", "--seqlen", "1024"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and err[0].startswith("tokenforge tune:"), err


def test_tune_refuses_bad_shapes(capsys):
    assert main(["tune", "attention", "--heads", "6", "--kv-heads", "4"]) == 2
    assert "multiple of --kv-heads" in capsys.readouterr().err
    assert main(["tune", "attention", "--seqlen", "0"]) == 2
    assert "--seqlen must be at least 1" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tune_attention_writes_the_cache(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("TOKENFORGE_TUNE_CACHE", str(tmp_path / "tune.json"))
    from tokenforge.kernels import attention as ak

    monkeypatch.setattr(ak, "_DISK", None)
    assert main(["tune", "attention", "--seqlen", "2048", "--heads", "8", "--kv-heads", "2"]) == 0
    entries = json.loads((tmp_path / "tune.json").read_text())
    assert any("_attn_fwd" in k for k in entries) and any("_attn_bwd_dq" in k for k in entries)
