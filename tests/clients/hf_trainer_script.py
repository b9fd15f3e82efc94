"""A small, unmodified Hugging Face Trainer script (no tokenforge in it): a tiny Llama built from a
config, three training steps, then evaluate() with an accuracy compute_metrics. It prints one JSON
line of metrics (and writes it to --out): tests/test_run.py runs it plain and under
`tokenforge run` and compares the two. ``--collator`` picks how examples become batches: equal
blocks (Trainer's default collator), documents of varied lengths right-padded with an attention
mask, or packed into one row by transformers' DataCollatorWithFlattening (position ids restart).
``--model qwen3_moe`` trains a tiny Qwen3-MoE instead, with output_router_logits (its load-balancing
loss in the training loss; evaluation's predictions then hold the router logits as well).
``--deepspeed CONFIG`` trains under DeepSpeed instead (launched by torchrun, one process a rank; on
the CPU, DS_ACCELERATOR=cpu and gloo) and reports the training losses only: accelerate's gather in
evaluate() fails on CPU ranks under DeepSpeed, with or without tokenforge."""

import argparse
import json

import torch
from transformers import (AutoModelForCausalLM, DataCollatorWithFlattening, LlamaConfig, Qwen3MoeConfig, Trainer,
                          TrainingArguments)


class TokenBlocks(torch.utils.data.Dataset):
    def __init__(self, n, seq_len, vocab, seed, varied=False):
        g = torch.Generator().manual_seed(seed)
        # A learnable pattern (each token is the previous plus one) with a little noise.
        start = torch.randint(1, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(seq_len)) % (vocab - 1) + 1
        noise = torch.rand(n, seq_len, generator=g) < 0.1
        self.ids[noise] = torch.randint(1, vocab, (int(noise.sum()),), generator=g)
        self.lengths = (torch.randint(seq_len // 3, seq_len + 1, (n,), generator=g) if varied
                        else torch.full((n,), seq_len)).tolist()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i, :self.lengths[i]]
        return {"input_ids": ids, "labels": ids.clone()}


def pad_right(features):
    """Documents right-padded with token 0 to the longest one; padding masked out and not scored."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, f in enumerate(features):
        ids[row, :len(f["input_ids"])] = f["input_ids"]
        mask[row, :len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    if isinstance(logits, tuple):  # an MoE model's outputs: the logits are the 3-D one
        logits = next(x for x in logits if getattr(x, "ndim", 0) == 3)
    predictions = logits.argmax(-1)[:, :-1]
    targets = labels[:, 1:]
    return {"accuracy": float((predictions == targets).mean()), "n_predictions": int(logits.size)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--collator", choices=["blocks", "padded", "packed"], default="blocks")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config file")
    parser.add_argument("--model", choices=["llama", "qwen3_moe"], default="llama")
    args = parser.parse_args()

    torch.manual_seed(0)
    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    if args.model == "qwen3_moe":
        config = Qwen3MoeConfig(**sizes, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                output_router_logits=True, router_aux_loss_coef=0.1)
    else:
        config = LlamaConfig(**sizes)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=3e-3, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=args.deepspeed is None, seed=0, deepspeed=args.deepspeed, dataloader_num_workers=0, disable_tqdm=True,
    )
    varied = args.collator != "blocks"
    collator = {"blocks": None, "padded": pad_right, "packed": DataCollatorWithFlattening()}[args.collator]
    trainer = Trainer(model=model, args=training_args, train_dataset=TokenBlocks(32, 24, 128, 1, varied),
                      eval_dataset=TokenBlocks(8, 24, 128, 2, varied), compute_metrics=compute_metrics,
                      data_collator=collator)
    train = trainer.train()
    if args.deepspeed:
        rank = torch.distributed.get_rank()
        result = {"train_loss": train.training_loss, "rank": rank,
                  "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
        print(json.dumps(result))
        if rank == 0:
            with open(args.out, "w") as f:
                json.dump(result, f)
        return
    metrics = trainer.evaluate()
    result = {"train_loss": train.training_loss, "eval_loss": metrics["eval_loss"],
              "eval_accuracy": metrics["eval_accuracy"], "eval_n_predictions": metrics["eval_n_predictions"],
              "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                else trainer.optimizer).__module__}
    print(json.dumps(result))
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
