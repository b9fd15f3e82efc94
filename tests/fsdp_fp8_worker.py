"""Run by tests/test_fp8_linear.py::test_fsdp_float8_all_gather_matches_one_process under torchrun
(2 gloo ranks on 127.0.0.1; 3 for uneven shards: 128 and 64 rows over 3 ranks): a stack of Float8Linear layers sharded with FSDP2's fully_shard and
its weights all-gathered in fp8 (Float8LinearConfig(enable_fsdp_float8_all_gather=True)) trains
what the same model does unsharded in one process on the whole batch; with and without
precompute_float8_dynamic_scale_for_fsdp, and the same as FSDP2 gathering the weights in fp32.
Writes the per-step losses of each run and what the fp8 path did (counters) to OUT.json.

    torchrun --nproc_per_node 2|3 tests/fsdp_fp8_worker.py OUT.json
"""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from tokenforge.fp8 import CastConfig, Float8LinearConfig, convert_to_float8
from tokenforge.fp8 import fsdp as fp8_fsdp
from tokenforge.fp8 import linear as fp8_linear

OUT = sys.argv[1]
STEPS, BATCH, DIM = 3, 48, 64  # BATCH splits evenly over 2 and 3 ranks


def config(all_gather: bool) -> Float8LinearConfig:
    # Scales that do not depend on how the batch is split across ranks (per token for x and dY;
    # dW in high precision), so the sharded run can match one process to rounding.
    axis = CastConfig(scaling_granularity="axiswise")
    off = CastConfig(scaling_type="disabled")
    return Float8LinearConfig(cast_config_input=axis, cast_config_grad_output=axis,
                              cast_config_input_for_grad_weight=off, cast_config_grad_output_for_grad_weight=off,
                              enable_fsdp_float8_all_gather=all_gather)


def build(all_gather: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.ReLU(), nn.Linear(2 * DIM, DIM), nn.ReLU(), nn.Linear(DIM, 48))
    convert_to_float8(model, config=config(all_gather), skip_first_last=False, backend="torch")
    return model


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, 48, generator=g)


def final_weights(model):
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def train(model, rank_slice, precompute=False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x[rank_slice]), y[rank_slice])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if precompute:
            fp8_fsdp.precompute_float8_dynamic_scale_for_fsdp(model)
        total = loss.detach().clone()
        if dist.is_initialized() and rank_slice != slice(None):
            dist.all_reduce(total)
            total /= dist.get_world_size()
        losses.append(total.item())
    return losses


def sharded(all_gather, precompute=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build(all_gather)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rank, world = dist.get_rank(), dist.get_world_size()
    part = BATCH // world
    losses = train(model, slice(rank * part, (rank + 1) * part), precompute)
    return losses, final_weights(model)


def main():
    dist.init_process_group("gloo")
    counts = {"pre_all_gather": 0, "fp8_weight_in_forward": 0, "all_reduce_in_pre_all_gather": 0}
    real_pre, real_scale = fp8_fsdp.Float8AllGatherWeight.fsdp_pre_all_gather, \
        fp8_fsdp.Float8AllGatherWeight._whole_weight_scale

    def counting_pre(self, mesh, outer_size, outer_stride, module, mp_policy):  # FSDP2 reads the signature
        counts["pre_all_gather"] += 1
        inputs, metadata = real_pre(self, mesh, outer_size, outer_stride, module, mp_policy)
        counts["all_gather_bytes_per_element"] = inputs[0].element_size()
        return inputs, metadata

    def counting_scale(self, mesh):
        fresh = self._precomputed is None or self._precomputed[1] != self._tensor._version
        counts["all_reduce_in_pre_all_gather"] += int(fresh)
        return real_scale(self, mesh)

    fp8_fsdp.Float8AllGatherWeight.fsdp_pre_all_gather = counting_pre
    fp8_fsdp.Float8AllGatherWeight._whole_weight_scale = counting_scale
    real_linear = fp8_linear.float8_linear

    def counting_linear(x, weight, *args, **kwargs):  # what Float8Linear.forward hands the kernels
        counts["fp8_weight_in_forward"] += int(isinstance(weight, fp8_fsdp.Float8Weight))
        return real_linear(x, weight, *args, **kwargs)

    fp8_linear.float8_linear = counting_linear
    one = build(False)
    result = {"one_process": train(one, slice(None))}
    reference = final_weights(one)
    for name, all_gather, precompute in (("fsdp_fp32_all_gather", False, False), ("fsdp_fp8_all_gather", True, False),
                                         ("fsdp_fp8_all_gather_precomputed", True, True)):
        counts.update({k: 0 for k in counts})
        losses, weights = sharded(all_gather, precompute)
        result[name] = losses
        result[name + "_max_weight_diff"] = max((w - r).abs().max().item() for w, r in zip(weights, reference))
        if name == "fsdp_fp32_all_gather":
            sharded_reference = weights  # the same sharding, gathered in fp32: the reduce-scatter's own rounding
        result[name + "_max_weight_diff_vs_fsdp_fp32"] = max(
            (w - r).abs().max().item() for w, r in zip(weights, sharded_reference))
        result[name + "_counts"] = dict(counts)
    if dist.get_rank() == 0:
        with open(OUT, "w") as fh:
            json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
