"""``tokenforge train``: train the reference transformer with or without tokenforge's kernels.

    tokenforge train --preset tiny --max-steps 200 --out runs/tiny         # embedded stdlib corpus
    tokenforge train --preset tiny --max-steps 400 --out runs/tiny --resume
    tokenforge train --preset 125m --compare --max-steps 30 --json bench/results/latest/compare.json
    torchrun --nproc_per_node 8 -m tokenforge.train --dist fsdp --preset 1b --seq-len 4096

    tokenforge train --preset tiny --optimizer muon --target-loss 2.2 --eval-every 10
    tokenforge train --compare --variants eager+adamw,kernels+muon --target-loss 2.2 --eval-every 10

bf16 autocast on a GPU, fp32 on the CPU. The optimizer is tokenforge.optim.AdamW when it imports
(torch.optim.AdamW otherwise, said in the summary), or with ``--optimizer muon`` tokenforge.optim.Muon
(hidden matrices; AdamW for embeddings, head and norms; Moonlight's update scaling, so ``--lr`` and
``--weight-decay`` mean what they mean for AdamW); ``--qk-clip TAU`` adds MuonClip's QK-clip. Warmup +
cosine LR; gradient accumulation and clipping. ``--kernels off`` is plain PyTorch; ``on`` is
``tokenforge.patch(model)``. ``--target-loss L`` stops a run when the evaluated validation loss
reaches L and reports the steps, tokens, training wall time (evaluations not counted), GPU-hours
and dollars it took; under ``--compare`` each variant (which may name its optimizer:
``kernels+muon``) runs to the target or to --max-steps, and the table gives the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from tokenforge import checkpoint, metrics
from tokenforge.data import BatchSampler, load_corpus
from tokenforge.fp8.config import RECIPES as FP8_RECIPES
from tokenforge.fp8.fsdp import precompute_float8_dynamic_scale_for_fsdp
from tokenforge.distributed import DistContext, all_reduce_mean, setup, shard_experts, teardown, unwrap, wrap
from tokenforge.models.transformer import CONFIG_ONLY_PRESETS, PRESETS, Block, Transformer, TransformerConfig

VARIANTS = ("eager", "compile", "kernels", "kernels+compile", "fp8")
OPTIMIZERS = ("adamw", "muon")


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--preset", choices=list(PRESETS), help="model size (default: tiny on CPU, 125m on GPU)")
    m.add_argument("--config", metavar="FILE", help="JSON of TransformerConfig fields (may name a \"preset\" to start from)")
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="FILE|DIR|.bin", help="text file, directory, or uint16 .bin (default: Python stdlib source)")
    d.add_argument("--tokenizer", metavar="FILE", help="Hugging Face tokenizers JSON (default: bytes, vocab 256)")
    d.add_argument("--val-fraction", type=float, default=0.1, help="tail of the corpus kept for validation")
    d.add_argument("--max-data-bytes", type=int, help="read at most this much text (faster start)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=int, default=100)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per rank")
    o.add_argument("--seq-len", type=int, help="tokens per sequence (default: 128 on CPU, min(2048, max_seq_len) on GPU)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr x this")
    o.add_argument("--warmup-steps", type=int, help="linear warmup (default: 10%% of --max-steps, at most 200)")
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--clip", type=float, default=1.0, help="global grad-norm clip (0: off)")
    o.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="adamw, or muon (Newton-Schulz on hidden matrices, AdamW for the rest; same --lr)")
    o.add_argument("--qk-clip", type=float, metavar="TAU",
                   help="MuonClip's QK-clip: rescale W_q/W_k of heads whose max attention logit passed TAU (off)")
    o.add_argument("--target-loss", type=float, metavar="L",
                   help="stop when the evaluated val loss is <= L; report steps, tokens, time and $ to reach it")
    k = p.add_argument_group("speed")
    k.add_argument("--kernels", choices=("on", "off"), default="on", help="tokenforge.patch the model (off: plain PyTorch)")
    k.add_argument("--compile", action="store_true", help="torch.compile the model")
    k.add_argument("--fp8", action="store_true", help="FP8 linear layers (tokenforge.fp8), where supported")
    k.add_argument("--fp8-recipe", default="tensorwise",
                   choices=FP8_RECIPES,
                   help="FP8 scaling recipe (with --fp8; blockwise: DeepSeek-V3's 1x128 activations, 128x128 weights)")
    k.add_argument("--fp8-all-gather", action="store_true",
                   help="with --fp8 --dist fsdp: FSDP2 all-gathers the weights in fp8 (1 byte an element; "
                        "tensorwise weight scales, computed for every layer once per step)")
    k.add_argument("--device", default="auto", help="auto, cpu or cuda")
    k.add_argument("--dist", choices=("none", "ddp", "fsdp"), default="none", help="under torchrun: DDP or FSDP2")
    k.add_argument("--ep", type=int, default=1, help="expert parallelism: MoE experts sharded over this many ranks "
                   "(with --dist ddp; the number of ranks), tokens exchanged with all-to-all")
    r = p.add_argument_group("run")
    r.add_argument("--out", metavar="DIR", help="checkpoints and metrics.jsonl go here")
    r.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (exactly)")
    r.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    r.add_argument("--stop-at", type=int, help="stop after this step as if interrupted (for testing --resume)")
    r.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps (0: only at the end)")
    r.add_argument("--eval-iters", type=int, default=4, help="validation batches per evaluation")
    r.add_argument("--log-every", type=int, default=10, help="plain progress line every N steps")
    r.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto")
    r.add_argument("--plot", metavar="PNG", help="loss / tokens/s plot (needs matplotlib)")
    c = p.add_argument_group("compare")
    c.add_argument("--compare", action="store_true", help="same config and batches: eager, compile, kernels, fp8")
    c.add_argument("--variants", help=f"comma list from {', '.join(VARIANTS)}, each optionally +adamw or +muon "
                                      "(default: --optimizer)")
    c.add_argument("--timing-warmup", type=int, default=2, help="steps left out of the timing (compilation, autotune)")
    c.add_argument("--gpu-price", type=float, help="$/GPU-hour for $/M tokens (default: tokenforge.cost's rate)")
    c.add_argument("--json", metavar="FILE", help="write the compare table (or run summary) as JSON")


def check_args(args) -> None:
    """Refuse values that would run nothing, run wrong, or die deep inside (one line, what to do)."""
    positive = {"--max-steps": args.max_steps, "--batch-size": args.batch_size, "--grad-accum": args.grad_accum,
                "--eval-iters": args.eval_iters, "--log-every": args.log_every, "--ep": args.ep}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    non_negative = {"--ckpt-every": args.ckpt_every, "--eval-every": args.eval_every,
                    "--timing-warmup": args.timing_warmup, "--warmup-steps": args.warmup_steps or 0}
    for name, value in non_negative.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (a token and its successor), got {args.seq_len}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.clip < 0 or args.weight_decay < 0 or not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--clip and --weight-decay must be >= 0 and --min-lr-ratio in [0, 1] (got {args.clip}, "
                         f"{args.weight_decay}, {args.min_lr_ratio})")
    if args.max_data_bytes is not None and args.max_data_bytes < 1:
        raise ValueError(f"--max-data-bytes must be positive, got {args.max_data_bytes}")
    if args.qk_clip is not None and not 0 < args.qk_clip < math.inf:
        raise ValueError(f"--qk-clip must be a positive logit threshold (Kimi K2 used 100), got {args.qk_clip}")
    if args.target_loss is not None:
        if not math.isfinite(args.target_loss):
            raise ValueError(f"--target-loss must be a finite loss, got {args.target_loss}")
        if args.eval_every == 0:
            raise ValueError("--target-loss compares the evaluated val loss: pass --eval-every N > 0 "
                             "(how often to check; smaller is finer but costs evaluation time)")
    if args.fp8_all_gather and not (args.fp8 and args.dist == "fsdp"):
        raise ValueError("--fp8-all-gather all-gathers FSDP2's weights in fp8: it needs --fp8 and --dist fsdp "
                         "(under torchrun)")
    if args.fp8_all_gather and args.fp8_recipe not in ("tensorwise",):
        raise ValueError(f"--fp8-all-gather needs tensorwise weight scales (one scale a weight, agreed across "
                         f"shards); --fp8-recipe {args.fp8_recipe} scales weights by row or block: use "
                         "--fp8-recipe tensorwise")
    if args.ep > 1 and args.dist != "ddp":
        raise ValueError(f"--ep {args.ep} needs --dist ddp under torchrun with {args.ep} ranks: "
                         f"torchrun --nproc_per_node {args.ep} -m tokenforge.train --dist ddp --ep {args.ep} ...")
    if args.compare and args.timing_warmup >= args.max_steps:
        raise ValueError(f"--timing-warmup {args.timing_warmup} leaves no timed step of --max-steps {args.max_steps}; "
                         "raise --max-steps or lower --timing-warmup")


def build_config(args) -> TransformerConfig:
    check_args(args)
    on_gpu = _device_type(args) == "cuda"
    overrides = {}
    preset = args.preset
    if args.config:
        with open(args.config) as f:
            overrides = json.load(f)
        preset = overrides.pop("preset", preset)
    preset = preset or ("125m" if on_gpu else "tiny")
    if preset in CONFIG_ONLY_PRESETS:
        raise ValueError(f"the {preset} preset is config-only (published sizes for num_params and tokenforge cost); "
                         "train moe-tiny (CPU) or moe-2b (GPU) instead")
    if args.seq_len is None:
        base = TransformerConfig.preset(preset, **overrides)
        args.seq_len = min(2048, base.max_seq_len) if on_gpu else min(128, base.max_seq_len)
    cfg = TransformerConfig.preset(preset, **overrides)
    if args.seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the {preset} model's context (max_seq_len "
                         f"{cfg.max_seq_len}); lower it, or pass --config FILE with a larger max_seq_len")
    args.preset = preset
    return cfg


def _device_type(args) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(args.device).type


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, sharded: bool = False,
                   optimizer: str = "adamw", kernels: bool = True) -> tuple[torch.optim.Optimizer, str]:
    """AdamW over matrices (decayed) and vectors (not): tokenforge's if it imports (and, for FSDP2's
    sharded DTensor parameters, says it handles them), else torch's. ``optimizer="muon"``:
    tokenforge.optim.Muon by muon_param_groups' rule, with Moonlight's update scaling
    (match_rms_adamw) so lr and weight decay carry over from AdamW; without ``kernels`` its
    Newton-Schulz runs as torch matmuls (the plain-PyTorch side of a comparison)."""
    if optimizer == "muon":
        from tokenforge.optim import Muon, muon_param_groups

        groups = muon_param_groups(model)
        opt = Muon(groups, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw",
                   adamw_betas=(0.9, 0.95), adamw_eps=1e-8, backend=None if kernels else "torch")
        n = sum(len(g["params"]) for g in groups if g["use_muon"])
        return opt, (f"tokenforge.optim.Muon ({n} hidden matrices, match_rms_adamw; AdamW for embeddings, "
                     f"head and norms; Newton-Schulz: {'tokenforge kernels' if kernels else 'torch matmuls'})")
    if optimizer != "adamw":
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8)
    why = ""
    try:
        from tokenforge.optim import AdamW

        # The multi-tensor kernels take raw pointers and sizes: on a DTensor they must use the local
        # shard. AdamW.SUPPORTS_DTENSOR = True is the optimizer's promise that it does.
        if not sharded or getattr(AdamW, "SUPPORTS_DTENSOR", False):
            return AdamW(groups, **kw), "tokenforge.optim.AdamW"
        why = "tokenforge.optim.AdamW does not declare FSDP2 DTensor support (AdamW.SUPPORTS_DTENSOR)"
    except ImportError as exc:
        why = f"tokenforge.optim unavailable ({exc})"
    fused = any(p.is_cuda for p in decay)
    return (torch.optim.AdamW(groups, fused=fused or None, **kw),
            f"torch.optim.AdamW{' (fused)' if fused else ''}: {why}")


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio`` at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def resume_schedule(scheduler, optimizer, saved: Optional[dict], warmup: int, args) -> Optional[str]:
    """The LR schedule of a resumed run, one rule: the checkpoint's warmup length is kept (a resumed
    run never re-enters warmup because a larger --max-steps has a longer default one) and the
    cosine runs from the end of that warmup to this command's --max-steps and --min-lr-ratio; every
    step from the first resumed one on takes this schedule's LR for its step number. With the same
    --max-steps that is exactly the uninterrupted run's schedule. (LambdaLR restores the LR the
    checkpoint's last step computed from the old schedule; it is recomputed here.) Returns a note
    when the schedule changed."""
    saved = saved or {}
    if args.warmup_steps is None and "warmup" in saved:
        warmup = int(saved["warmup"])
    schedule = lr_lambda(warmup, args.max_steps, args.min_lr_ratio)
    scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
    scheduler.tokenforge_warmup = warmup
    step = scheduler.last_epoch  # steps taken: the next one uses schedule(step)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * schedule(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    old_total = saved.get("max_steps")
    if old_total is not None and old_total != args.max_steps:
        return (f"LR schedule: warmup {warmup} kept, cosine now ends at step {args.max_steps} (was {old_total}); "
                f"step {step + 1} runs at lr {scheduler._last_lr[0]:.3g}")
    return None


def clip_grads(model: torch.nn.Module, max_norm: float, ctx: DistContext, expert_names: list = ()) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if expert_names:
        from tokenforge.distributed import clip_sharded_grads_

        named = dict(model.named_parameters())
        return clip_sharded_grads_(params, {id(named[n]) for n in expert_names}, max_norm)
    if ctx.mode != "fsdp":  # FSDP2 grads are DTensors: torch's clip knows how to reduce them
        try:
            from tokenforge.optim import clip_grad_norm_

            return clip_grad_norm_(params, max_norm)
        except ImportError:
            pass
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def fp8_unavailable(device: torch.device) -> Optional[str]:
    """Why --fp8 cannot run here, or None."""
    try:
        from tokenforge.fp8.linear import Float8Linear  # noqa: F401
    except ImportError as exc:
        return f"tokenforge.fp8 is not available in this build ({exc})"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return f"FP8 needs sm_89+ (this GPU is sm_{''.join(map(str, torch.cuda.get_device_capability(device)))})"
    return None


def convert_fp8(model: Transformer, recipe: str = "tensorwise", all_gather: bool = False) -> int:
    """Swap the blocks' eligible nn.Linear layers for tokenforge.fp8 Float8Linear (the head stays
    high precision: the fused cross-entropy reads its weight directly). ``all_gather``: weights
    all-gathered in fp8 under FSDP2 (Float8LinearConfig.enable_fsdp_float8_all_gather). Returns (Linear layers converted, MoE layers with fp8 experts)."""
    import dataclasses

    from tokenforge.fp8 import Float8LinearConfig, convert_to_float8

    config = Float8LinearConfig.from_recipe_name(recipe)
    if all_gather:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    # Within the blocks there is no embedding-adjacent or head layer to protect.
    report = convert_to_float8(model.layers, config=config, skip_first_last=False)
    return len(report.converted), len(report.experts)


def kernel_backend_note(device: torch.device) -> str:
    """Which backend tokenforge's ops pick on this device, in a phrase (e.g. the torch fallback on CPU)."""
    try:
        from tokenforge import backends, ops  # noqa: F401

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        inputs = backends.example_inputs("rms_norm", device.type, dtype)
        if inputs is None:
            return "?"
        b, why = backends.explain("rms_norm", *inputs)
        return f"{b} ({why})"
    except Exception as exc:  # informative only
        return f"? ({exc})"


@dataclass
class Variant:
    name: str
    kernels: bool
    compile: bool
    fp8: bool
    optimizer: str = "adamw"


def variant_of(args) -> Variant:
    name = ("kernels" if args.kernels == "on" else "eager") + ("+compile" if args.compile else "")
    if args.fp8:
        name = "fp8" if args.kernels == "on" and not args.compile else name + "+fp8"
    if args.optimizer != "adamw":
        name += f"+{args.optimizer}"
    return Variant(name, args.kernels == "on", args.compile, args.fp8, args.optimizer)


def parse_variant(name: str, optimizer: str = "adamw") -> Variant:
    """``eager``, ``kernels+compile``, ... optionally ending in ``+adamw`` / ``+muon`` (else
    ``optimizer``, from --optimizer)."""
    base = name
    for opt in OPTIMIZERS:
        if name.endswith(f"+{opt}"):
            base, optimizer = name[: -len(opt) - 1], opt
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}, each optionally "
                         f"followed by +adamw or +muon")
    return Variant(name, kernels=base.startswith(("kernels", "fp8")), compile=base.endswith("compile"),
                   fp8=base == "fp8", optimizer=optimizer)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    variant: str
    losses: list = field(default_factory=list)       # (step, loss) for every step run
    val_losses: list = field(default_factory=list)   # (step, val loss)
    tokens_per_s: float = 0.0                         # all ranks, median step after the timing warmup
    mfu: Optional[float] = None
    peak_mem: int = 0
    usd_per_mtok: Optional[float] = None
    optimizer: str = ""
    patch: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0                        # sum of step times (evaluation not counted)
    target: Optional[dict] = None                     # --target-loss: where it was reached


@torch.no_grad()
def evaluate(model, sampler: BatchSampler, iters: int, device, autocast, ctx: DistContext) -> float:
    """Mean loss over the first ``iters`` validation batches (the same ones every time). ``model``
    is the uncompiled module (no recompilation for no_grad; the model has no dropout, so no eval())."""
    total = torch.zeros((), device=device)
    for i in range(iters):
        x, y = sampler.batch_at(i, device)
        with autocast():
            total += model(x, y).float()
    return float(all_reduce_mean(total / iters, ctx))


def train_run(args, cfg: TransformerConfig, corpus, variant: Variant, ctx: DistContext, *,
              log: Optional[metrics.JsonlWriter] = None, progress_mode: Optional[str] = None) -> RunResult:
    """Train ``variant`` for args.max_steps from args.seed (or from the checkpoint with --resume)."""
    device = ctx.device
    res = RunResult(variant.name)
    torch.manual_seed(args.seed)
    with device:  # initialise in place: a 1b+ model's init on the CPU then a copy is slow
        model = Transformer(cfg)
    if variant.kernels:
        import tokenforge

        report = tokenforge.patch(model)
        res.patch = list(report.patched) + [f"skipped {s}" for s in report.skipped]
        res.notes.append(f"kernels backend on {device.type}: {kernel_backend_note(device)}")
    if variant.fp8:
        reason = fp8_unavailable(device)
        if reason:
            res.notes.append(f"--fp8 skipped: {reason}")
        else:
            fp8_all_gather = bool(getattr(args, "fp8_all_gather", False))
            n, moes = convert_fp8(model, getattr(args, "fp8_recipe", "tensorwise"), all_gather=fp8_all_gather)
            res.notes.append(f"fp8: {n} Linear layers -> tokenforge.fp8.Float8Linear"
                             + (f", {moes} MoE layers' experts -> grouped fp8 GEMMs" if moes else "")
                             + (", weights all-gathered in fp8" if fp8_all_gather else "")
                             + (" (CPU: emulated, no speedup)" if device.type == "cpu" else ""))
    raw = model
    expert_names = shard_experts(raw, ctx, args.ep) if getattr(args, "ep", 1) > 1 else []
    if expert_names:
        res.notes.append(f"expert parallel over {ctx.world} ranks: {cfg.n_experts // ctx.world} of "
                         f"{cfg.n_experts} experts per rank per MoE layer, tokens exchanged with all-to-all")
    model = wrap(model, ctx, block_types=(Block,), ignore=tuple(expert_names))
    optimizer, res.optimizer = make_optimizer(raw, args.lr, args.weight_decay, sharded=ctx.mode == "fsdp",
                                              optimizer=variant.optimizer, kernels=variant.kernels)
    qk_clip = None
    if getattr(args, "qk_clip", None) is not None:
        from tokenforge.optim import QKClip

        qk_clip = QKClip(raw, threshold=args.qk_clip, optimizer=optimizer)
        res.notes.append(f"QK-clip at max logit {args.qk_clip:g} (one extra Q K^T per layer per step to find it)")
    warmup = args.warmup_steps if args.warmup_steps is not None else min(200, max(1, args.max_steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, args.max_steps, args.min_lr_ratio))
    scheduler.tokenforge_warmup = warmup
    if variant.compile:
        model = torch.compile(model)
    sampler = BatchSampler(corpus.train, args.batch_size, args.seq_len, seed=args.seed, rank=ctx.rank, world=ctx.world)
    val_sampler = BatchSampler(corpus.val, args.batch_size, args.seq_len, seed=args.seed + 1, rank=ctx.rank,
                               world=ctx.world)
    ckpt_path = os.path.join(args.out, checkpoint.CHECKPOINT_NAME) if args.out else None
    start = 0
    if args.resume:
        if not ckpt_path:
            raise ValueError("--resume needs --out DIR (the checkpoint is DIR/checkpoint.pt)")
        payload = checkpoint.load(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, ctx=ctx,
                                  expert_names=expert_names)
        start = payload["step"]
        if start >= args.max_steps:
            raise ValueError(f"--resume: the checkpoint in {args.out} is at step {start}, so --max-steps "
                             f"{args.max_steps} leaves nothing to run; pass --max-steps > {start} to continue")
        sampler.load_state_dict(payload["sampler"])
        res.notes.append(f"resumed from {ckpt_path} at step {start}")
        note = resume_schedule(scheduler, optimizer, payload.get("extra", {}).get("schedule"), warmup, args)
        if note:
            res.notes.append(note)
        warmup = scheduler.tokenforge_warmup

    on_gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * ctx.world
    fpt = cfg.flops_per_token(args.seq_len)
    peak, price = metrics.peak_flops(device), args.gpu_price or metrics.default_price(device)
    stop = min(args.max_steps, args.stop_at) if args.stop_at else args.max_steps
    mode = progress_mode or (args.progress if ctx.is_main else "none")
    bar = metrics.Progress(stop, initial=start, mode=mode, every=args.log_every, desc=variant.name)
    metrics.reset_peak_memory(device)
    step_times: list[float] = []
    target = getattr(args, "target_loss", None)
    t_run = time.perf_counter()
    try:
        for step in range(start + 1, stop + 1):
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro in range(args.grad_accum):
                x, y = sampler.next(device)
                sync = contextlib.nullcontext()
                if ctx.mode == "ddp" and micro < args.grad_accum - 1:
                    sync = model.no_sync()
                elif ctx.mode == "fsdp":
                    unwrap(model).set_requires_gradient_sync(micro == args.grad_accum - 1)
                with sync:
                    with autocast():
                        loss = model(x, y) / args.grad_accum
                    loss.backward()
                loss_sum += loss.detach().float()
            grad_norm = clip_grads(raw, args.clip, ctx, expert_names) if args.clip > 0 else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            if variant.fp8 and getattr(args, "fp8_all_gather", False):
                # Every layer's fp8 weight scale for the next all-gathers: one fused amax, one all-reduce.
                precompute_float8_dynamic_scale_for_fsdp(raw)
            if qk_clip is not None:
                qk_clip.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_val = float(all_reduce_mean(loss_sum, ctx))  # .item() syncs the device: honest timing
            metrics.synchronize(device)
            dt = time.perf_counter() - t0
            res.train_seconds += dt
            if step - start > args.timing_warmup or (stop - start) <= args.timing_warmup:
                step_times.append(dt)
            tps = tokens_per_step / dt
            step_mfu = metrics.mfu(tps, fpt, peak, ctx.world)
            mem = metrics.peak_memory(device)
            res.losses.append((step, loss_val))
            record = {"step": step, "loss": loss_val, "lr": lr, "tokens_per_s": tps,
                      # read after the loss's sync: no second stall inside the step
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "mfu": step_mfu, "peak_mem": mem, "variant": variant.name,
                      "tokens": step * tokens_per_step}
            if qk_clip is not None:
                record["qk_max_logit"], record["qk_clipped_heads"] = qk_clip.last_max_logit, qk_clip.clipped_heads
            load = raw.expert_load() if hasattr(raw, "expert_load") else None
            if load is not None:  # MoE: tokens per expert of the last micro-batch, per MoE layer
                per_layer = load.float()
                imbalance = float((per_layer.max(1).values / per_layer.mean(1).clamp_min(1e-9)).max())
                record["expert_load"] = per_layer.tolist()
                record["expert_load_max_over_mean"] = imbalance
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss is {loss_val} at step {step} ({variant.name}); lower --lr")
            reached = False
            if (args.eval_every and step % args.eval_every == 0) or step == args.max_steps:
                val = evaluate(raw, val_sampler, args.eval_iters, device, autocast, ctx)
                record["val_loss"] = val
                res.val_losses.append((step, val))
                bar.write(f"step {step}: val loss {val:.4f}")
                if target is not None and val <= target:
                    reached = True
                    hours = res.train_seconds * ctx.world / 3600
                    res.target = {"loss": target, "val_loss": val, "step": step, "tokens": step * tokens_per_step,
                                  "train_seconds": res.train_seconds, "gpu_hours": hours,
                                  "usd": hours * price if price else None}
                    bar.write(f"step {step}: target val loss {target:g} reached")
            if log is not None and ctx.is_main:
                log.write(record)
            # The progress line shows what the summary table will: the median over the timed steps
            # so far (this step's own figure only while every step is still in the timing warmup).
            shown_tps = tokens_per_step / statistics.median(step_times) if step_times else tps
            shown_mfu = metrics.mfu(shown_tps, fpt, peak, ctx.world)
            stats = {"loss": f"{loss_val:.4f}",
                     ("tok/s (median)" if step_times else "tok/s (untimed)"): f"{shown_tps:,.0f}"}
            if shown_mfu is not None:
                stats["mfu"] = f"{shown_mfu:.1%}"
            stats["mem"] = metrics.fmt_bytes(mem)
            if load is not None:
                stats["experts max/mean"] = f"{imbalance:.2f}"
            bar.update(step, stats)
            if ckpt_path and ((args.ckpt_every and step % args.ckpt_every == 0) or step == stop or reached):
                checkpoint.save(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                sampler_state=sampler.state_dict(), step=step, ctx=ctx, expert_names=expert_names,
                                extra={"config": cfg.to_dict(), "variant": variant.name, "seed": args.seed,
                                       "schedule": {"warmup": warmup, "max_steps": args.max_steps,
                                                    "min_lr_ratio": args.min_lr_ratio}})
            res.steps = step - start
            if reached:
                break
    finally:
        bar.close()
    res.seconds = time.perf_counter() - t_run
    # The median step: robust to a stray slow step (a recompile, a checkpoint, a busy neighbour).
    res.tokens_per_s = tokens_per_step / statistics.median(step_times) if step_times else 0.0
    res.mfu = metrics.mfu(res.tokens_per_s, fpt, peak, ctx.world)
    res.peak_mem = metrics.peak_memory(device)
    res.usd_per_mtok = metrics.usd_per_mtok(res.tokens_per_s, price, ctx.world)
    return res


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


def header(args, cfg, corpus, ctx: DistContext) -> list[str]:
    n = cfg.num_params()
    active = f", {cfg.num_params(active=True) / 1e6:.2f}M active ({cfg.n_experts} experts, top-{cfg.n_experts_per_token})" \
        if cfg.n_experts else ""
    return [f"tokenforge train: {args.preset} preset ({n / 1e6:.2f}M params{active}, {cfg.n_layers} layers, dim {cfg.dim}), "
            f"seq {args.seq_len}, batch {args.batch_size} x accum {args.grad_accum} x {ctx.world} rank(s)",
            f"  data: {corpus.source}; {corpus.tokenizer} tokenizer; {len(corpus.train):,} train / "
            f"{len(corpus.val):,} val tokens",
            f"  device: {metrics.device_name(ctx.device)}"
            f"{' (bf16 autocast)' if ctx.device.type == 'cuda' else ' (fp32)'}"
            f"{'' if ctx.mode == 'none' else f', {ctx.mode} over {ctx.world} ranks'}"]


def summary(res: RunResult, args) -> list[str]:
    lines = [f"done: {res.steps} steps in {res.seconds:.1f}s; final loss {res.losses[-1][1]:.4f}"
             if res.losses else "done: no steps run"]
    if res.val_losses:
        lines.append(f"  val loss {res.val_losses[-1][1]:.4f} at step {res.val_losses[-1][0]}")
    mfu = f"{res.mfu:.1%}" if res.mfu is not None else "n/a (no GPU peak for this device)"
    lines.append(f"  {res.tokens_per_s:,.0f} tokens/s, MFU {mfu}, peak memory {metrics.fmt_bytes(res.peak_mem)}"
                 + (f", ${res.usd_per_mtok:.3f}/M tokens" if res.usd_per_mtok else ""))
    lines.append(f"  optimizer: {res.optimizer}")
    if getattr(args, "target_loss", None) is not None:
        lines.append("  " + target_line(res, args.target_loss))
    lines += [f"  kernels: {p}" for p in res.patch]
    lines += [f"  note: {n}" for n in res.notes]
    if args.out:
        lines.append(f"  outputs: {args.out}/metrics.jsonl, {args.out}/{checkpoint.CHECKPOINT_NAME}")
    return lines


def target_line(res: RunResult, target: float) -> str:
    """One line: where --target-loss was reached (steps, tokens, time, GPU-hours, $), or that it was not."""
    t = res.target
    if t is None:
        best = min((v for _, v in res.val_losses), default=float("nan"))
        return f"target val loss {target:g}: not reached in {res.steps} steps (best val loss {best:.4f})"
    usd = f", ${t['usd']:.4f}" if t["usd"] is not None else ""
    return (f"target val loss {target:g}: reached at step {t['step']} ({t['tokens']:,} tokens, "
            f"{t['train_seconds']:.1f} s of training, {t['gpu_hours']:.4f} GPU-hours{usd})")


def compare_table(results: list[RunResult], device: torch.device, target: Optional[float] = None,
                  eval_every: int = 0) -> tuple[list[str], list[dict]]:
    """Rows per variant against the eager one (or the first). With ``target``, also the steps,
    tokens and GPU-hours (= $, one price for all) to reach it, as ratios to the base variant."""
    base = next((r for r in results if r.variant in ("eager", "eager+adamw")), results[0])
    rows = []
    for r in results:
        max_diff = max((abs(a[1] - b[1]) for a, b in zip(r.losses, base.losses)), default=0.0)
        row = {"variant": r.variant, "tokens_per_s": r.tokens_per_s, "mfu": r.mfu, "peak_mem": r.peak_mem,
               "usd_per_mtok": r.usd_per_mtok,
               "speedup": r.tokens_per_s / base.tokens_per_s if base.tokens_per_s else None,
               "final_loss": r.losses[-1][1] if r.losses else None, "max_loss_diff_vs_eager": max_diff,
               "optimizer": r.optimizer, "notes": r.notes}
        if target is not None:
            row["target"] = r.target
            reach = r.target is not None and base.target is not None
            row["tokens_to_target_ratio"] = r.target["tokens"] / base.target["tokens"] if reach else None
            row["cost_to_target_ratio"] = (r.target["gpu_hours"] / base.target["gpu_hours"]
                                           if reach and base.target["gpu_hours"] else None)
        rows.append(row)
    head = (f"  {'variant':<20} {'tokens/s':>12} {'MFU':>7} {'peak mem':>11} {'$/Mtok':>9} {'speedup':>8} "
            f"{'loss':>8} {'|dloss|':>8}")
    if target is not None:
        head += f" {'steps->L':>9} {'tok->L':>8} {'$->L':>8}"
    lines = [head]
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        usd = f"{row['usd_per_mtok']:.3f}" if row["usd_per_mtok"] else "-"
        sp = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        line = (f"  {row['variant']:<20} {row['tokens_per_s']:>12,.0f} {mfu:>7} {metrics.fmt_bytes(row['peak_mem']):>11} "
                f"{usd:>9} {sp:>8} {row['final_loss']:>8.4f} {row['max_loss_diff_vs_eager']:>8.2e}")
        if target is not None:
            steps = str(row["target"]["step"]) if row["target"] else "not hit"
            tok = f"{row['tokens_to_target_ratio']:.2f}x" if row["tokens_to_target_ratio"] else "-"
            cost = f"{row['cost_to_target_ratio']:.2f}x" if row["cost_to_target_ratio"] else "-"
            line += f" {steps:>9} {tok:>8} {cost:>8}"
        lines.append(line)
    if target is not None:
        lines.append(f"  (->L: to val loss {target:g}, checked every {eval_every} steps; tok->L and $->L are ratios to "
                     f"{base.variant}; $ counts training steps at one price, evaluations excluded)")
    if device.type == "cpu":
        lines.append("  (CPU: no MFU or $ without a GPU peak/price; peak mem is the process's max RSS, cumulative;")
        lines.append("   the kernels run as their PyTorch references or the Triton interpreter: speed means "
                     "something only on a GPU)")
    return lines, rows


def default_variants(device: torch.device) -> list[str]:
    out = ["eager", "compile", "kernels"]
    if fp8_unavailable(device) is None and device.type == "cuda":
        out.append("fp8")
    return out


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    check_args(args)  # before the process group: a bad flag is one line on every rank, no hang
    ctx = setup(args.dist, args.device)
    try:
        return _run(args, ctx)
    finally:
        teardown(ctx)


def _say(ctx: DistContext, *lines: str) -> None:
    if ctx.is_main:
        for line in lines:
            print(line, flush=True)


def _run(args, ctx: DistContext) -> int:
    cfg = build_config(args)
    corpus = load_corpus(args.data, args.tokenizer, args.val_fraction, args.max_data_bytes)
    if corpus.vocab_size > cfg.vocab_size:
        cfg = TransformerConfig.preset(args.preset, **{**_config_overrides(args), "vocab_size": corpus.vocab_size,
                                                      "max_seq_len": cfg.max_seq_len})
    _say(ctx, *header(args, cfg, corpus, ctx))
    if args.out and ctx.is_main:
        os.makedirs(args.out, exist_ok=True)
    log = metrics.JsonlWriter(os.path.join(args.out, "metrics.jsonl"), append=args.resume) \
        if args.out and ctx.is_main else None
    try:
        if args.compare:
            if args.resume:
                raise ValueError("--compare runs every variant from scratch; drop --resume")
            names = args.variants.split(",") if args.variants else default_variants(ctx.device)
            variants = [parse_variant(n.strip(), args.optimizer) for n in names]
            out_dir, args.out = args.out, None  # no checkpoints for the comparison runs
            results = []
            for i, v in enumerate(variants):
                if v.fp8 and fp8_unavailable(ctx.device):
                    _say(ctx, f"  {v.name}: skipped: {fp8_unavailable(ctx.device)}")
                    continue
                _say(ctx, f"-- {v.name}: {args.max_steps} steps")
                results.append(train_run(args, cfg, corpus, v, ctx, log=log))
                _release(ctx.device, v)
                if ctx.is_main and args.json and i + 1 < len(variants):
                    # Each finished variant is on disk at once: a run cut short keeps what it measured.
                    _write_json(args.json, _compare_payload(
                        args, cfg, ctx, compare_table(results, ctx.device, args.target_loss)[1], complete=False))
            args.out = out_dir
            lines, rows = compare_table(results, ctx.device, args.target_loss, args.eval_every)
            _say(ctx, "", f"compare: {args.preset}, seq {args.seq_len}, {args.max_steps} steps each "
                          f"(first {args.timing_warmup} untimed, median step), same batches, on {metrics.device_name(ctx.device)}",
                 *lines)
            for r in results:
                for n in r.notes:
                    _say(ctx, f"  {r.variant}: {n}")
            for opt_desc in dict.fromkeys(r.optimizer for r in results):
                _say(ctx, f"  optimizer: {opt_desc}")
            payload = _compare_payload(args, cfg, ctx, rows, complete=True)
        else:
            res = train_run(args, cfg, corpus, variant_of(args), ctx, log=log)
            _say(ctx, *summary(res, args))
            payload = {"device_name": metrics.device_name(ctx.device), "preset": args.preset,
                       "seq_len": args.seq_len, "losses": res.losses, "val_losses": res.val_losses,
                       "rows": [{"variant": res.variant, "tokens_per_s": res.tokens_per_s, "mfu": res.mfu,
                                 "peak_mem": res.peak_mem, "usd_per_mtok": res.usd_per_mtok,
                                 "optimizer": res.optimizer, "steps": res.steps,
                                 "train_seconds": res.train_seconds, "target": res.target}]}
    finally:
        if log is not None:
            log.close()
    if ctx.is_main and args.json:
        _write_json(args.json, payload)
        print(f"  wrote {args.json}")
    if ctx.is_main and args.plot:
        if not args.out:
            print("  --plot needs --out DIR (it plots DIR/metrics.jsonl)")
        else:
            why = metrics.plot(os.path.join(args.out, "metrics.jsonl"), args.plot)
            print(f"  plot: {why}" if why else f"  wrote {args.plot}")
    return 0


def _compare_payload(args, cfg, ctx: DistContext, rows: list[dict], complete: bool) -> dict:
    """The --compare JSON; ``complete`` is False while variants are still to run."""
    return {"device_name": metrics.device_name(ctx.device), "preset": args.preset, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "world": ctx.world,
            "steps": args.max_steps, "target_loss": args.target_loss, "eval_every": args.eval_every,
            "config": cfg.to_dict(), "rows": rows, "complete": complete}


def _write_json(path: str, payload: dict) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def _release(device: torch.device, variant: Variant) -> None:
    """Free one comparison run's model, optimizer and compiled graphs before the next one."""
    import gc

    if variant.compile:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _config_overrides(args) -> dict:
    if not args.config:
        return {}
    with open(args.config) as f:
        d = json.load(f)
    d.pop("preset", None)
    return d


def run_cli(args: argparse.Namespace) -> int:
    """Run parsed arguments (from ``main`` or the ``tokenforge train`` subcommand); errors the user
    can fix become a one-line message and exit status 2."""
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tokenforge train: {exc}", file=sys.stderr)
        return 2


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tokenforge train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
