"""A small, unmodified data-parallel Hugging Face script (no tokenforge in it), meant for torchrun:
gloo process group, a tiny Llama from a config wrapped in DistributedDataParallel, two AdamW steps
on each rank's own batch. Rank 0 writes the losses (averaged over ranks) to --out; tests/test_run.py
runs it under torchrun plain and through `-m tokenforge.run`."""

import argparse
import json

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial weights on every rank
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = torch.nn.parallel.DistributedDataParallel(AutoModelForCausalLM.from_config(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    losses = []
    for _ in range(2):
        ids = torch.randint(0, 96, (2, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / dist.get_world_size())
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "optimizer": type(optimizer).__module__}, f)
    # Free DDP (its reducer holds the process group) while the group is alive, then tear it down
    # together: a DDP object left to interpreter exit can deadlock gloo's worker thread on the GIL.
    del model, optimizer
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
