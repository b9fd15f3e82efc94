"""Data-parallel training: 2 CPU processes over gloo (torchrun on 127.0.0.1) train what one
process does on the same global batch: DDP, and FSDP2 (fully_shard, with tokenforge's AdamW on
the sharded DTensor parameters) including a checkpoint that resumes exactly."""

import json

import pytest
from torchrun import torchrun

from tokenforge import train
from tokenforge.metrics import read_jsonl

COMMON = ["--preset", "tiny", "--seq-len", "32", "--max-data-bytes", "400000", "--eval-every", "0",
          "--eval-iters", "1", "--progress", "none", "--kernels", "off", "--lr", "3e-3", "--max-steps", "4"]


def _torchrun(args, nproc=2, timeout=240):
    return torchrun(["-m", "tokenforge.train", *args], nproc=nproc, timeout=timeout)


def _tokenforge_adamw_takes_dtensors() -> bool:
    try:
        from tokenforge.optim import AdamW
    except ImportError:
        return False
    return bool(getattr(AdamW, "SUPPORTS_DTENSOR", False))


def _single(tmp_path, name):
    out = tmp_path / name
    assert train.main(COMMON + ["--batch-size", "4", "--out", str(out)]) == 0
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]


def _assert_close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):  # same data and math; only the order of the gradient reductions differs
        assert abs(x - y) <= 1e-5 * abs(y), (a, b)


def test_ddp_two_processes_match_single(tmp_path):
    ref = _single(tmp_path, "single")
    out = tmp_path / "ddp"
    text = _torchrun(COMMON + ["--dist", "ddp", "--batch-size", "2", "--out", str(out),
                               "--json", str(tmp_path / "ddp.json")])
    assert text.count("tokenforge train:") == 1  # rank 0 logs, rank 1 is quiet
    assert "ddp over 2 ranks" in text
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    _assert_close(losses, ref)
    assert len(json.loads((tmp_path / "ddp.json").read_text())["losses"]) == 4
    assert (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_fsdp_two_processes_match_single_and_resume(tmp_path):
    ref = _single(tmp_path, "single")
    out = tmp_path / "fsdp"
    args = COMMON + ["--dist", "fsdp", "--batch-size", "2", "--out", str(out)]
    text = _torchrun(args + ["--stop-at", "2"])
    assert "fsdp over 2 ranks" in text
    # tokenforge's AdamW on the sharded DTensor params once it declares support; torch's until then.
    expected = "optimizer: tokenforge.optim.AdamW" if _tokenforge_adamw_takes_dtensors() else \
        "optimizer: torch.optim.AdamW"
    assert expected in text
    text = _torchrun(args + ["--resume"])
    assert "resumed from" in text
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    _assert_close(losses, ref)


@pytest.mark.slow
def test_fsdp_with_fp8_linears_matches_single(tmp_path, monkeypatch):
    """Float8Linear under FSDP2 quantizes the all-gathered weight: 2 sharded ranks train what one
    process does. The recipe is rowwise_with_gw_hp, whose scales do not depend on how the batch is
    split (rowwise activation scales; dW in high precision); a tensorwise activation scale is the
    amax of each rank's own half of the batch, so it legitimately differs from one process's.
    Both runs use the torch backend: the child processes have no Triton interpreter, and two fp8
    implementations may round a value on a boundary differently, which training then amplifies."""
    monkeypatch.setenv("TOKENFORGE_BACKEND", "torch")
    fp8_args = COMMON + ["--fp8", "--fp8-recipe", "rowwise_with_gw_hp", "--batch-size"]
    single = tmp_path / "single"
    assert train.main(fp8_args + ["4", "--out", str(single)]) == 0
    ref = [r["loss"] for r in read_jsonl(single / "metrics.jsonl")]
    out = tmp_path / "fsdp_fp8"
    text = _torchrun(fp8_args + ["2", "--dist", "fsdp", "--out", str(out)])
    assert "fsdp over 2 ranks" in text and "fp8" in text
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == len(ref)
    for x, y in zip(losses, ref):
        assert abs(x - y) <= 1e-4 * abs(y), (losses, ref)


@pytest.mark.slow
def test_fsdp_fp8_all_gather_trains_what_the_bf16_all_gather_does(tmp_path, monkeypatch):
    """--fp8-all-gather: FSDP2 gathers the Float8Linear weights as fp8 bytes cast with the whole
    weight's scale (agreed by a max-all-reduce, precomputed after each optimizer step), which is
    what quantizing the gathered weight gives, so 2 ranks train what the same run gathering in
    high precision does (same sharding, same tensorwise recipe)."""
    monkeypatch.setenv("TOKENFORGE_BACKEND", "torch")
    args = COMMON + ["--fp8", "--fp8-recipe", "tensorwise", "--batch-size", "2", "--dist", "fsdp"]
    runs = {}
    for name, extra in (("gather_hp", []), ("gather_fp8", ["--fp8-all-gather"])):
        out = tmp_path / name
        text = _torchrun(args + extra + ["--out", str(out)])
        assert ("weights all-gathered in fp8" in text) == bool(extra), text[-2000:]
        runs[name] = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(runs["gather_fp8"]) == 4
    for x, y in zip(runs["gather_fp8"], runs["gather_hp"]):
        assert abs(x - y) <= 1e-6 * abs(y), runs


def test_fp8_all_gather_flag_says_what_it_needs(capsys):
    for extra, words in ((["--fp8-all-gather"], "needs --fp8 and --dist fsdp"),
                         (["--fp8", "--fp8-all-gather", "--dist", "fsdp", "--fp8-recipe", "rowwise"],
                          "needs tensorwise weight scales")):
        assert train.main(COMMON + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


@pytest.mark.slow
@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_muon_two_processes_match_single(tmp_path, dist):
    """Muon under DDP (whole matrices on every rank) and FSDP2 (DTensor shards: each matrix
    gathered to its owner rank, orthogonalised once, scattered back) trains what one process does."""
    muon = COMMON + ["--optimizer", "muon"]
    single = tmp_path / "single"
    assert train.main(muon + ["--batch-size", "4", "--out", str(single)]) == 0
    ref = [r["loss"] for r in read_jsonl(single / "metrics.jsonl")]
    out = tmp_path / dist
    text = _torchrun(muon + ["--dist", dist, "--batch-size", "2", "--out", str(out)])
    assert f"{dist} over 2 ranks" in text and "optimizer: tokenforge.optim.Muon" in text
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == len(ref)
    # bf16 Newton-Schulz of gradients that differ in the last bits (reduction order): a little
    # looser than AdamW's 1e-5
    for x, y in zip(losses, ref):
        assert abs(x - y) <= 1e-4 * abs(y), (losses, ref)


def test_expert_parallel_two_processes_match_single_and_resume(tmp_path):
    """--ep 2: each of 2 gloo ranks holds 4 of moe-tiny's 8 experts and exchanges tokens with
    all-to-all; with DDP over the same ranks it trains what one process does (losses per step),
    clips by the global norm, and its checkpoint (every expert, gathered) resumes exactly."""
    import torch

    moe = [a if a != "tiny" else "moe-tiny" for a in COMMON]
    single = tmp_path / "single"
    assert train.main(moe + ["--batch-size", "4", "--out", str(single)]) == 0
    ref = [r["loss"] for r in read_jsonl(single / "metrics.jsonl")]
    out = tmp_path / "ep"
    args = moe + ["--dist", "ddp", "--ep", "2", "--batch-size", "2", "--out", str(out)]
    text = _torchrun(args + ["--stop-at", "2"])
    assert "expert parallel over 2 ranks: 4 of 8 experts per rank" in text
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    whole = torch.load(single / "checkpoint.pt", weights_only=False)
    for name, value in whole["model"].items():  # every expert in the checkpoint, as one process has
        assert ckpt["model"][name].shape == value.shape, name
    text = _torchrun(args + ["--resume"])
    assert "resumed from" in text
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    _assert_close([r["loss"] for r in rows], ref)
    # The global gradient norm (clipping's): expert gradients averaged like DDP's, the sharded part
    # summed over ranks. (Losses alone cannot show a wrong gradient scale: AdamW is scale-invariant.)
    _assert_close([r["grad_norm"] for r in rows], [r["grad_norm"] for r in read_jsonl(single / "metrics.jsonl")])


def test_expert_parallel_refusals(capsys):
    assert train.main(COMMON + ["--batch-size", "2", "--ep", "2"]) == 2
    assert "--ep 2 needs --dist ddp" in capsys.readouterr().err
    assert train.main(COMMON + ["--batch-size", "2", "--ep", "0"]) == 2
    assert "--ep must be at least 1" in capsys.readouterr().err


def test_torchrun_timeout_stops_every_rank(tmp_path):
    """A hung worker fails its test at the timeout, and no rank outlives it (torchrun starts each
    rank in a session of its own: killing torchrun alone left them running, pipes held open)."""
    import subprocess
    import time

    worker = tmp_path / "hang_worker.py"
    worker.write_text("import time\nprint('up', flush=True)\ntime.sleep(600)\n")
    start = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 10 s"):
        torchrun([str(worker)], timeout=10)
    assert time.monotonic() - start < 60
    left = subprocess.run(["pgrep", "-f", str(worker)], capture_output=True, text=True).stdout
    assert not left.strip(), f"ranks still running: {left}"
