"""`tokenforge info` tells the truth about versions, the GPU, the extension and each op's backend."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

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
