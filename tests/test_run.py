"""`tokenforge run script.py`: unmodified client scripts (tests/clients/) give the plain run's numbers
with tokenforge's kernels put in before their imports, and the report says what was patched,
routed and left alone."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tokenforge import run as tf_run

CLIENTS = os.path.join(os.path.dirname(__file__), "clients")
HF_SCRIPT = os.path.join(CLIENTS, "hf_trainer_script.py")
NANOGPT_SCRIPT = os.path.join(CLIENTS, "nanogpt_script.py")

transformers = pytest.importorskip("transformers")


def _env():
    env = dict(os.environ)
    # CPU tensors take the Triton kernels only under the interpreter (as the tests do).
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _run(cmd, tmp_path, timeout=900):
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=timeout)
    return out


def _script_result(prefix, script, tmp_path, *extra):
    """Run ``script`` (with ``prefix`` before it: nothing, or a tokenforge run command) and return
    (its JSON result, the completed process)."""
    out_json = tmp_path / f"result{len(list(tmp_path.iterdir()))}.json"
    args = [str(script), "--out", str(out_json), *extra]
    proc = _run([*prefix, *args], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out_json.read_text()), proc


@pytest.mark.parametrize("collator", ["blocks", "padded", "packed"])
def test_hf_trainer_script_same_metrics_under_tokenforge_run(tmp_path, collator):
    """Equal blocks, right-padded documents, and documents packed by DataCollatorWithFlattening:
    the padded and packed batches run attention as varlen documents (not SDPA's dense masks)."""
    plain, _ = _script_result([sys.executable], HF_SCRIPT, tmp_path, "--output-dir", str(tmp_path / "plain"),
                              "--collator", collator)
    report_path = tmp_path / "report.json"
    routed, proc = _script_result([sys.executable, "-m", "tokenforge.run", "--optimizer", "--report", str(report_path)],
                                  HF_SCRIPT, tmp_path, "--output-dir", str(tmp_path / "routed"), "--collator", collator)
    # fp32 end to end: the fused loss, norm, SwiGLU and AdamW agree with PyTorch's to rounding.
    assert routed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    assert routed["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-4)
    # evaluate() got every logit (the fused loss did not swallow them) and the same predictions.
    assert routed["eval_n_predictions"] == plain["eval_n_predictions"]
    if collator == "blocks":
        assert plain["eval_n_predictions"] == 8 * 24 * 128
    assert routed["eval_accuracy"] == pytest.approx(plain["eval_accuracy"], abs=1.5 / (8 * 23))
    assert plain["optimizer"].startswith("torch") and routed["optimizer"].startswith("tokenforge")

    report = json.loads(report_path.read_text())
    assert report["exit_status"] == 0 and report["optimizer"] is True
    [model] = report["models"]
    assert model["model"] == "LlamaForCausalLM" and model["family"] == "llama"
    joined = " ".join(model["patched"])
    for part in ("rms_norm", "rope", "swiglu", "linear_cross_entropy"):
        assert part in joined, (part, model["patched"])
    calls = report["calls"]
    for op in ("linear_cross_entropy", "rms_norm", "swiglu", "rope"):
        assert calls.get(op, 0) > 0, (op, calls)
    # 3 training steps and 2 evaluation batches, 2 layers each.
    attention = "attention" if collator == "blocks" else "attention_varlen"
    assert calls.get(attention) == (3 + 2) * 2, calls
    assert report["optimizers"] == {"tokenforge.optim.AdamW": 1}
    # The same report on stderr, for a person.
    assert "patched LlamaForCausalLM" in proc.stderr and "calls  linear_cross_entropy" in proc.stderr


def test_hf_trainer_moe_script_same_metrics_under_tokenforge_run(tmp_path):
    """The same unmodified Trainer script on a Qwen3-MoE with output_router_logits: the known MoE
    family is patched as it is built (experts as grouped GEMMs, the fused loss with the family's
    load-balancing loss added) and trains and evaluates as the plain run does."""
    extra = ("--model", "qwen3_moe")
    plain, _ = _script_result([sys.executable], HF_SCRIPT, tmp_path, "--output-dir", str(tmp_path / "plain"), *extra)
    report_path = tmp_path / "report.json"
    routed, _ = _script_result([sys.executable, "-m", "tokenforge.run", "--report", str(report_path)], HF_SCRIPT,
                               tmp_path, "--output-dir", str(tmp_path / "routed"), *extra)
    assert routed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    assert routed["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-4)
    assert routed["eval_n_predictions"] == plain["eval_n_predictions"] == 8 * 24 * 128
    report = json.loads(report_path.read_text())
    [model] = report["models"]
    assert model["model"] == "Qwen3MoeForCausalLM" and model["family"] == "qwen3_moe"
    assert any("load-balancing loss" in line for line in model["patched"]), model["patched"]
    # 3 training steps and 2 evaluation batches, 2 MoE layers each; the fused loss in training only.
    assert report["calls"].get("grouped_mm") == (3 + 2) * 2 and report["calls"].get("linear_cross_entropy") == 3


def test_hf_trainer_under_deepspeed_zero3_same_losses(tmp_path):
    """The Trainer script under DeepSpeed ZeRO-3, 2 gloo ranks (parameters partitioned between
    them and gathered by DeepSpeed's hooks around each module's forward), plain and under
    `tokenforge run --optimizer`: the same loss at every step. The fused loss reads the LM head's
    weight inside the head's own forward, where ZeRO-3 has gathered it; DeepSpeed wraps the
    swapped-in tokenforge AdamW as a client optimizer; padded batches run attention as documents."""
    pytest.importorskip("deepspeed")
    from torchrun import free_port

    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}))
    env_extra = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]

    def run(name, *prefix):
        out = tmp_path / f"{name}.json"
        cmd = [*launch, "--master_port", str(free_port()), *prefix, HF_SCRIPT, "--out", str(out), "--output-dir",
               str(tmp_path / name), "--collator", "padded", "--deepspeed", str(config)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), **env_extra}, cwd=tmp_path,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return json.loads(out.read_text())

    plain = run("plain")
    report_path = tmp_path / "report.json"
    routed = run("routed", "-m", "tokenforge.run", "--optimizer", "--report", str(report_path))
    assert len(plain["losses"]) == len(routed["losses"]) == 3
    for a, b in zip(routed["losses"], plain["losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    report = json.loads(report_path.read_text())
    assert report["optimizers"] == {"tokenforge.optim.AdamW": 1}
    for op in ("linear_cross_entropy", "rms_norm", "swiglu", "rope", "attention_varlen"):
        assert report["calls"].get(op, 0) > 0, (op, report["calls"])


def test_nanogpt_script_same_losses_and_sdpa_routed(tmp_path):
    plain, _ = _script_result([sys.executable], NANOGPT_SCRIPT, tmp_path)
    report_path = tmp_path / "report.json"
    cli = shutil.which("tokenforge", path=os.path.dirname(sys.executable))
    prefix = [cli, "run"] if cli else [sys.executable, "-m", "tokenforge", "run"]
    routed, _ = _script_result([*prefix, "--optimizer", "--report", str(report_path)], NANOGPT_SCRIPT, tmp_path)
    assert len(routed["losses"]) == len(plain["losses"]) == 3
    # bf16 autocast: attention in the kernel vs PyTorch's rounds differently; the first loss sees
    # only the forward, the later ones one and two optimizer steps.
    for a, b in zip(routed["losses"], plain["losses"]):
        assert a == pytest.approx(b, rel=2e-2)
    assert routed["optimizer"].startswith("tokenforge")
    report = json.loads(report_path.read_text())
    assert report["models"] == []  # a model of its own: nothing to patch, its SDPA calls are routed
    assert report["calls"]["attention (sdpa routed)"] > 0
    assert report["calls"]["attention (sdpa passed through to PyTorch)"] == 0
    assert report["optimizers"] == {"tokenforge.optim.AdamW": 1}


def test_kernels_none_runs_plain_and_counts_nothing(tmp_path):
    report_path = tmp_path / "report.json"
    result, proc = _script_result([sys.executable, "-m", "tokenforge.run", "--kernels", "none", "--quiet",
                                   "--report", str(report_path)], NANOGPT_SCRIPT, tmp_path, "--steps", "1")
    report = json.loads(report_path.read_text())
    assert report["kernels"] == [] and report["calls"] == {} and report["optimizers"] == {}
    assert result["optimizer"].startswith("torch")
    assert "tokenforge run:" not in proc.stderr  # --quiet


def test_bad_usage_is_one_line_and_exit_2(tmp_path):
    for args, needle in ((["--kernels", "attn,bogus", NANOGPT_SCRIPT], "unknown part"),
                         ([str(tmp_path / "missing.py")], "no such script"),
                         (["--report", str(tmp_path / "no" / "dir" / "r.json"), NANOGPT_SCRIPT], "does not exist")):
        proc = _run([sys.executable, "-m", "tokenforge.run", *args], tmp_path, timeout=300)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_failing_script_keeps_its_exit_status_and_writes_the_report(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('working')\nsys.exit(3)\n")
    report_path = tmp_path / "r.json"
    proc = _run([sys.executable, "-m", "tokenforge.run", "--report", str(report_path), str(script)], tmp_path, 300)
    assert proc.returncode == 3 and "working" in proc.stdout
    assert json.loads(report_path.read_text())["exit_status"] == 3
    script.write_text("raise RuntimeError('the script broke')\n")
    proc = _run([sys.executable, "-m", "tokenforge.run", "--report", str(report_path), str(script)], tmp_path, 300)
    assert proc.returncode == 1 and "the script broke" in proc.stderr
    assert json.loads(report_path.read_text())["exit_status"] == 1


def test_script_sees_its_own_argv_and_main(tmp_path):
    script = tmp_path / "echo.py"
    script.write_text("import json, sys\nif __name__ == '__main__':\n"
                      "    print(json.dumps(sys.argv))\n")
    proc = _run([sys.executable, "-m", "tokenforge.run", "--quiet", str(script), "--lr", "3", "x"], tmp_path, 300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip()) == [str(script), "--lr", "3", "x"]


def _tiny_llama_config(**kw):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, **kw)
    config._attn_implementation = "sdpa"
    return config


def test_session_patches_every_way_a_model_is_built_and_uninstall_restores():
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, LlamaModel
    from transformers.modeling_utils import PreTrainedModel

    post_init, from_config = PreTrainedModel.__dict__["post_init"], PreTrainedModel.__dict__["_from_config"]
    torch_adamw = torch.optim.AdamW
    session = tf_run.Session(tf_run.parse_kernels("all"), optimizer=True)
    session.install()
    try:
        direct = LlamaForCausalLM(_tiny_llama_config())
        built = AutoModelForCausalLM.from_config(_tiny_llama_config())
        bare = LlamaModel(_tiny_llama_config())  # no causal-LM head: not a family patch knows
        for m in (direct, built):
            assert getattr(m, "_tokenforge_undo", None) is not None
        assert getattr(bare, "_tokenforge_undo", None) is None
        opt = torch.optim.AdamW(direct.parameters(), lr=1e-3)
        assert isinstance(opt, torch.optim.AdamW) and type(opt).__module__.startswith("tokenforge")
        kept = torch.optim.AdamW(direct.parameters(), lr=1e-3, differentiable=True)  # the fused one refuses it
        assert type(kept) is torch_adamw
        report = session.report()
        assert [m["model"] for m in report["models"]] == ["LlamaForCausalLM", "LlamaForCausalLM"]
        assert "LlamaModel" in report["left_alone"]
        assert "differentiable" in report["left_alone"]["optimizer"]
        assert report["optimizers"] == {"tokenforge.optim.AdamW": 1, "torch.optim.AdamW": 1}
    finally:
        session.uninstall()
    assert PreTrainedModel.__dict__["post_init"] is post_init
    assert PreTrainedModel.__dict__["_from_config"] is from_config
    assert torch.optim.AdamW is torch_adamw
    after = LlamaForCausalLM(_tiny_llama_config())
    assert getattr(after, "_tokenforge_undo", None) is None


def test_script_patch_call_replaces_the_automatic_one():
    """A script that calls tokenforge.patch itself gets its own options, not an error."""
    import tokenforge
    from transformers import LlamaForCausalLM

    session = tf_run.Session(tf_run.parse_kernels("all"), optimizer=False)
    session.install()
    try:
        model = LlamaForCausalLM(_tiny_llama_config())
        report = tokenforge.patch(model, attention=False, cross_entropy=False)
        assert not any("linear_cross_entropy" in p for p in report.patched)
        tokenforge.unpatch(model)
        assert getattr(model, "_tokenforge_undo", None) is None
    finally:
        session.uninstall()


def test_torchrun_every_rank_patched_and_reported(tmp_path):
    """torchrun ... -m tokenforge.run script.py: each of 2 gloo ranks installs tokenforge before the
    script, patches its DDP-wrapped model, writes its own report; the losses are the plain run's."""
    from torchrun import torchrun

    script = os.path.join(CLIENTS, "hf_ddp_script.py")
    torchrun([script, "--out", str(tmp_path / "plain.json")], timeout=180)
    report = tmp_path / "r.json"
    torchrun(["-m", "tokenforge.run", "--optimizer", "--report", str(report), script,
              "--out", str(tmp_path / "routed.json")], timeout=180)
    plain = json.loads((tmp_path / "plain.json").read_text())
    routed = json.loads((tmp_path / "routed.json").read_text())
    assert routed["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    assert plain["optimizer"].startswith("torch") and routed["optimizer"].startswith("tokenforge")
    for path in (report, tmp_path / "r.rank1.json"):
        rank_report = json.loads(path.read_text())
        assert [m["model"] for m in rank_report["models"]] == ["LlamaForCausalLM"]
        assert rank_report["calls"]["linear_cross_entropy"] == 2 and rank_report["exit_status"] == 0
