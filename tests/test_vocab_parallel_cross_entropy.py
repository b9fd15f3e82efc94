"""tokenforge.ops.vocab_parallel_linear_cross_entropy: the fused loss of a head split by vocab rows
across ranks. The kernels (one rank's pass 1 and pass 2) against their torch twins in float64 row by
row; the op on 3 gloo ranks against the float64 loss of the whole head (tests/vocab_parallel_worker.py);
bad input; the custom op."""

import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from tokenforge.ops import vocab_parallel_linear_cross_entropy
from tokenforge.ops.vocab_parallel_cross_entropy import _shard_grad_torch_, _shard_stats_torch, _combine
from tokenforge.testing import rel_error

from device_params import DEVICES, INTERPRETING

interpreting = pytest.mark.skipif(not INTERPRETING, reason="CPU kernel cases need TRITON_INTERPRET=1")


@pytest.fixture
def world_of_one():
    """A 1-rank gloo group in this process (and a 1-D device mesh over it), torn down after."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    path = tempfile.mktemp()
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        if os.path.exists(path):
            os.remove(path)


def _logits(rows, V, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V_local", [0, 1, 37, 300, 4097])
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_shard_kernels_match_torch_row_by_row(device, V_local, softcap):
    """Pass 1 (stats) and pass 2 (gradient) of one rank's slice, fp32 Triton vs float64 torch, every
    row: targets in this slice, in another, ignored; a slice starting past 0."""
    from tokenforge.kernels import cross_entropy as kernels_ce

    rows, start = 23, 1000
    x64 = _logits(rows, V_local, seed=V_local)
    g = torch.Generator().manual_seed(1)
    target = torch.randint(start, start + max(V_local, 1), (rows,), generator=g)
    target[1::3] = 7  # another rank's class
    target[::5] = -100
    stats = kernels_ce.vocab_shard_stats(x64.float().to(device), target.to(device), start, softcap=softcap).cpu()
    ref = _shard_stats_torch(x64, target, start, -100, softcap)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(stats)), (stats, ref)  # an empty slice's max is -inf
    assert rel_error(torch.where(finite, stats.double(), 0.0).T, torch.where(finite, ref, 0.0).T) < 1e-6
    # Pass 2 with coefficients as the combine makes them for a 1-rank group.
    loss, lse, factor = _combine(ref[None], target, start + V_local, -100, 0.1, 1e-3, False)
    coefs = torch.stack([lse, factor * 0.5, 0.9 * factor * 0.5, 0.1 / (start + V_local) * factor * 0.5])
    got = x64.float().to(device)
    kernels_ce.vocab_shard_grad_(got, target.to(device), coefs.float().to(device), start, softcap=softcap)
    got = got.cpu()
    want = x64.clone()
    _shard_grad_torch_(want, target, coefs, start, -100, softcap)
    if V_local:
        assert rel_error(got, want) < 1e-6
        assert torch.all(got[::5] == 0)


def test_worker_results_on_three_ranks(tmp_path):
    """3 gloo ranks, float64 torch backend: every layout, reduction and option (see the worker)."""
    _run_worker(tmp_path, "torch", tol=1e-10)


@interpreting
def test_worker_results_on_three_ranks_triton(tmp_path):
    """The same cases on the Triton kernels (interpreter, fp32)."""
    _run_worker(tmp_path, "triton", tol=2e-5)


def _run_worker(tmp_path, backend, tol):
    from torchrun import run_worker

    out = tmp_path / "result.json"
    run_worker("vocab_parallel_worker.py", backend, str(out), nproc=3, timeout=600)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 3
    for rank, cases in enumerate(per_rank):
        assert len(cases) == 31, sorted(cases)
        for case, errors in cases.items():
            assert errors.pop("same_on_every_rank") == 0.0, (rank, case, "ranks hold different losses")
            for what, err in errors.items():
                assert err <= tol, (rank, case, what, err)


def test_one_rank_is_linear_cross_entropy(world_of_one):
    """A group of one: the whole head on one rank; the same loss and gradients as the plain fused
    loss (float64)."""
    from tokenforge.ops import linear_cross_entropy

    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (2, 9), generator=g)
    t[0, :3] = -100
    a = vocab_parallel_linear_cross_entropy(h, w, t, label_smoothing=0.05, z_loss=1e-4)
    b = linear_cross_entropy(h, w, t, label_smoothing=0.05, z_loss=1e-4)
    ga, gb = torch.autograd.grad(a, (h, w)), torch.autograd.grad(b, (h, w))
    assert rel_error(a.reshape(1, 1), b.reshape(1, 1)) < 1e-12
    assert all(rel_error(x, y) < 1e-12 for x, y in zip(ga, gb))
    none = vocab_parallel_linear_cross_entropy(h, w, t, reduction="none")
    assert none.shape == t.shape


def test_dtensor_weight_on_a_mesh_of_one(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard

    mesh = init_device_mesh("cpu", (1,))
    g = torch.Generator().manual_seed(4)
    w = torch.randn(33, 8, generator=g, dtype=torch.float64)
    h = torch.randn(6, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 33, (6,), generator=g)
    dw = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(h, dw, t)
    loss.backward()
    ref_w = w.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h @ ref_w.T, t)
    ref.backward()
    assert abs(float(loss) - float(ref)) < 1e-12
    assert rel_error(dw.grad.to_local(), ref_w.grad) < 1e-12


def test_bad_input_without_a_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long))


def test_bad_inputs(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    dw = distribute_tensor(w, mesh, [Shard(0)])
    with pytest.raises(ValueError, match="leave group=None"):
        vocab_parallel_linear_cross_entropy(h, dw, t, group=dist.group.WORLD)
    with pytest.raises(ValueError, match="Shard\\(0\\)"):
        vocab_parallel_linear_cross_entropy(h, distribute_tensor(w, mesh, [Shard(1)]), t)
    with pytest.raises(ValueError, match="Shard\\(0\\)"):
        vocab_parallel_linear_cross_entropy(h, distribute_tensor(w, mesh, [Replicate()]), t)
    mesh2 = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    with pytest.raises(ValueError, match="same on every rank"):  # sharded on a mesh the weight is not on
        vocab_parallel_linear_cross_entropy(distribute_tensor(h, mesh2, [Replicate(), Shard(0)]), dw, t)
    dw2 = distribute_tensor(w, mesh2, [Replicate(), Shard(0)])
    with pytest.raises(ValueError, match="but the weight's vocab-sharded one"):  # sharded over data parallelism
        vocab_parallel_linear_cross_entropy(distribute_tensor(h, mesh2, [Shard(0), Replicate()]), dw2, t)
    with pytest.raises(ValueError, match="same on every rank"):  # plain shards: only Replicate DTensors
        vocab_parallel_linear_cross_entropy(distribute_tensor(h, mesh, [Shard(0)]), w, t)
    with pytest.raises(TypeError, match="sharded the same way"):
        vocab_parallel_linear_cross_entropy(h, dw, t, torch.zeros(10))
    with pytest.raises(TypeError, match="bias is a DTensor"):
        vocab_parallel_linear_cross_entropy(h, w, t, distribute_tensor(torch.zeros(10), mesh, [Shard(0)]))
    with pytest.raises(ValueError, match="slice"):
        vocab_parallel_linear_cross_entropy(h, w, t, torch.zeros(9))
    with pytest.raises(TypeError, match="dtype|cast"):
        vocab_parallel_linear_cross_entropy(h.double(), w, t)
    with pytest.raises(ValueError, match="out of range"):
        vocab_parallel_linear_cross_entropy(h, w, torch.full((4,), 10, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(TypeError, match="token_scaling"):
        vocab_parallel_linear_cross_entropy(h, w, t, token_scaling=1)


def test_module(world_of_one):
    from tokenforge.nn import VocabParallelLinearCrossEntropyLoss

    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(12, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 12, (5,), generator=g)
    loss = VocabParallelLinearCrossEntropyLoss(reduction="sum", softcap=2.0)(h, w, t)
    ref = torch.nn.functional.cross_entropy(2.0 * torch.tanh(h @ w.T / 2.0), t, reduction="sum")
    assert abs(float(loss) - float(ref)) < 1e-10
    assert "softcap=2.0" in repr(VocabParallelLinearCrossEntropyLoss(softcap=2.0))


def test_custom_op_opcheck(world_of_one):
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(6, 8, generator=g), torch.randn(12, 8, generator=g)
    t = torch.randint(0, 12, (6,), generator=g)
    name = dist.group.WORLD.group_name
    for need in (True, False):
        torch.library.opcheck(torch.ops.tokenforge.vocab_parallel_linear_cross_entropy_fwd,
                              (h, w, t, None, None, 0, 12, name, -100, 0.0, 0.0, 0.0, False, True, 4, need, need,
                               False, "torch"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_real_size_on_one_rank(world_of_one):
    """bf16 at 2048 tokens x 4096 hidden x 128256 vocab on the GPU, a group of one: loss and both
    gradients against the fp32 unfused head (the kernels' rows of 4096-column blocks, 32 of them)."""
    g = torch.Generator(device="cuda").manual_seed(7)
    N, H, V = 2048, 4096, 128256
    h = torch.randn(N, H, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) / H ** 0.5).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::7] = -100
    loss = vocab_parallel_linear_cross_entropy(h, w, t, z_loss=1e-4, softcap=30.0)
    gh, gw = torch.autograd.grad(loss, (h, w))
    h32, w32 = (x.detach().float().requires_grad_() for x in (h, w))
    logits = 30.0 * torch.tanh(h32 @ w32.T / 30.0)
    valid = t != -100
    lse = torch.logsumexp(logits, 1)
    ref = (torch.nn.functional.cross_entropy(logits, t, reduction="none") + 1e-4 * lse * lse)[valid].mean()
    rh, rw = torch.autograd.grad(ref, (h32, w32))
    assert abs(float(loss) - float(ref)) <= 1e-3 * abs(float(ref))
    assert rel_error(gh, rh) < 2e-2 and rel_error(gw, rw) < 2e-2
