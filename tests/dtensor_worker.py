"""Run by tests/test_dtensor.py under torchrun (2 gloo ranks on 127.0.0.1): every op that takes DTensor
inputs (tokenforge.dtensor), with the placements tensor and sequence parallelism hand it, against the
same op on the whole tensors: the output (its placements too) and every gradient.

    torchrun --nproc_per_node 2 tests/dtensor_worker.py BACKEND OUT.json
"""

import os
import sys

import torch
import torch.distributed as dist

BACKEND, OUT = sys.argv[1], sys.argv[2]
if BACKEND == "triton":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor  # noqa: E402

from tokenforge import ops  # noqa: E402
from tokenforge.testing import rel_error  # noqa: E402
from torchrun import write_per_rank  # noqa: E402

DTYPE = torch.float64 if BACKEND == "torch" else torch.float32


def full(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DTYPE)


def check(name, fn, acts, params, placements, want_out_placements, errors, mesh, param_grads=True):
    """fn on whole tensors vs fn on DTensors: acts[i] distributed with placements[i] (a Partial one
    as a per-rank share), params as DTensors Replicate (None: plain, used as is on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    acts_ref = [a.clone().requires_grad_() for a in acts]
    params_ref = [p.clone().requires_grad_(param_grads) for p, _ in params]
    ref = fn(*acts_ref, *params_ref)
    refs = ref if isinstance(ref, tuple) else (ref,)
    grad_outs = [full(r.shape, 99 + j) for j, r in enumerate(refs)]
    leaves = acts_ref + (params_ref if param_grads else [])
    ref_grads = torch.autograd.grad(sum((r * g).sum() for r, g in zip(refs, grad_outs)), leaves)

    d_acts, grad_of = [], []
    for a, pl in zip(acts, placements):
        if pl == "partial":  # rank r holds a share; the shares sum to a; each share's gradient is a's
            share = (a * (rank + 1) / (world * (world + 1) / 2)).requires_grad_()
            d_acts.append(DTensor.from_local(share, mesh, [Partial()], run_check=False))
            grad_of.append(share)
            continue
        elif pl == "plain":
            d_acts.append(a.clone().requires_grad_())
        else:
            d_acts.append(distribute_tensor(a.clone(), mesh, [pl]).requires_grad_())
        grad_of.append(d_acts[-1])
    d_params = [(distribute_tensor(p.clone(), mesh, [Replicate()]) if as_dtensor else p.clone()).requires_grad_(param_grads)
                for p, as_dtensor in params]
    out = fn(*d_acts, *d_params)
    outs = out if isinstance(out, tuple) else (out,)
    result = {}
    for j, (o, r) in enumerate(zip(outs, refs)):
        result[f"out{j}"] = rel_error(o.full_tensor(), r)
        result[f"placement{j}"] = str(list(o.placements)) == str(want_out_placements[j])
    loss = sum((o.full_tensor() * g).sum() for o, g in zip(outs, grad_outs))
    loss.backward()
    for i, (leaf, want) in enumerate(zip(grad_of + (d_params if param_grads else []), ref_grads)):
        g = leaf.grad
        if isinstance(g, DTensor):
            g = g.full_tensor()
        elif i >= len(d_acts) and not params[i - len(d_acts)][1]:
            # a plain parameter beside row-sharded activations: each rank holds its rows' share
            dist.all_reduce(g)
        result[f"grad{i}"] = rel_error(g, want)
    errors[name] = result


def main():
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    x, r, w = full((3, 4, 8), 1), full((3, 4, 8), 2), full((8,), 3)
    errors = {}
    rms = lambda x, w: ops.rms_norm(x, w, 1e-6, backend=BACKEND)  # noqa: E731
    # Liger's case: the normalised dim sharded (gathered), the weight a replicated DTensor
    check("rms_norm-shard-last", rms, [x], [(w, True)], [Shard(2)], [[Replicate()]], errors, mesh)
    # sequence parallel: rows sharded, weight gradient Partial then summed
    check("rms_norm-shard-rows", rms, [x], [(w, True)], [Shard(1)], [[Shard(1)]], errors, mesh)
    check("rms_norm-plain-weight", rms, [x], [(w, False)], [Shard(0)], [[Shard(0)]], errors, mesh)
    gemma = lambda x, w: ops.rms_norm(x, w, 1e-6, offset=1.0, casting_mode="llama", backend=BACKEND)  # noqa: E731
    check("rms_norm-gemma-llama-cast", gemma, [x], [(w, True)], [Shard(1)], [[Shard(1)]], errors, mesh)
    add = lambda x, r, w: ops.add_rms_norm(x, r, w, 1e-6, backend=BACKEND)  # noqa: E731
    check("add_rms_norm-residual-replicated", add, [x, r], [(w, True)], [Shard(1), Replicate()],
          [[Shard(1)], [Shard(1)]], errors, mesh)
    check("add_rms_norm-partial-x", add, [x, r], [(w, True)], ["partial", Shard(0)],
          [[Replicate()], [Replicate()]], errors, mesh)
    swi = lambda g, u: ops.swiglu(g, u, backend=BACKEND)  # noqa: E731
    # tensor parallel: the intermediate dim sharded, elementwise on each shard
    check("swiglu-shard-hidden", swi, [x, r], [], [Shard(2), Shard(2)], [[Shard(2)]], errors, mesh)
    check("swiglu-up-replicated", swi, [x, r], [], [Shard(2), Replicate()], [[Shard(2)]], errors, mesh)
    check("swiglu-up-plain", swi, [x, r], [], [Shard(0), "plain"], [[Shard(0)]], errors, mesh)
    check("swiglu-partial-gate", swi, [x, r], [], ["partial", Shard(1)], [[Replicate()]], errors, mesh)
    mult = lambda g, u: ops.swiglu(g, u, gate_multiplier=0.5, down_multiplier=2.0, backend=BACKEND)  # noqa: E731
    check("swiglu-multipliers", mult, [x, r], [], [Shard(2), Shard(2)], [[Shard(2)]], errors, mesh)
    check("geglu-shard-rows", lambda g, u: ops.geglu(g, u, backend=BACKEND), [x, r], [], [Shard(0), Shard(0)],
          [[Shard(0)]], errors, mesh)
    check("swiglu_packed-shard-last", lambda t: ops.swiglu_packed(t, backend=BACKEND), [x], [], [Shard(2)],
          [[Replicate()]], errors, mesh)
    # RoPE: heads sharded (tensor parallel); a sharded sequence is gathered (cos/sin are whole)
    q, k = full((2, 6, 4, 8), 4), full((2, 6, 2, 8), 5)
    angle = full((6, 4), 6)
    cos, sin = torch.cat((angle.cos(), angle.cos()), -1), torch.cat((angle.sin(), angle.sin()), -1)
    rope = lambda q, k, c, s: ops.rope(q, k, c, s, backend=BACKEND)  # noqa: E731
    check("rope-shard-heads", rope, [q, k], [(cos, False), (sin, False)], [Shard(2), Shard(2)],
          [[Shard(2)], [Shard(2)]], errors, mesh, param_grads=False)
    check("rope-shard-seq", rope, [q, k], [(cos, True), (sin, True)], [Shard(1), Shard(1)],
          [[Replicate()], [Replicate()]], errors, mesh, param_grads=False)
    # Hugging Face's tensor parallelism: plain activations, a replicated DTensor weight: plain output
    xg, wd = x.clone().requires_grad_(), distribute_tensor(w.clone(), mesh, [Replicate()]).requires_grad_()
    wg = w.clone().requires_grad_()
    y, want = rms(xg, wd), rms(x.clone(), wg)
    dy = full(x.shape, 7)
    (y * dy).sum().backward()
    (want * dy).sum().backward()
    errors["rms_norm-dtensor-weight-only"] = {
        "out0": rel_error(y, want) if not isinstance(y, DTensor) else float("inf"),
        "grad1": rel_error(wd.grad.full_tensor(), wg.grad)}
    # Attention takes local tensors: a clear refusal, and patch_sdpa leaves DTensor calls to SDPA
    from tokenforge import sdpa_patch

    dq = distribute_tensor(full((2, 4, 4, 16), 8).to(torch.bfloat16), mesh, [Shard(1)])
    try:
        ops.attention(dq, dq, dq)
        refused = False
    except TypeError as exc:
        refused = "local tensors" in str(exc)
    reason = sdpa_patch._route_reason(dq, dq, dq, None, 0.0, True, None, False, {}) or ""
    try:  # a vocab-sharded weight's gradient depends on how hidden is laid out: refused
        ops.linear_cross_entropy(full((6, 8), 9), distribute_tensor(full((10, 8), 10), mesh, [Shard(0)]),
                                 torch.randint(0, 10, (6,)))
        lce_refused = False
    except TypeError as exc:
        lce_refused = "full_tensor" in str(exc)
    try:
        ops.cross_entropy(distribute_tensor(full((6, 10), 11), mesh, [Shard(1)]), torch.randint(0, 10, (6,)))
        ce_refused = False
    except TypeError as exc:
        ce_refused = "loss_parallel" in str(exc)
    errors["attention-refuses-dtensor"] = {"placement0": refused, "placement1": "DTensor" in reason,
                                           "placement2": lce_refused, "placement3": ce_refused}
    write_per_rank(errors, OUT)


if __name__ == "__main__":
    main()
