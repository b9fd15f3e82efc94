"""The ``tokenforge`` command: ``tokenforge info``, ``train``, ``cost``, ``run`` (an unmodified training script
with the kernels installed before its imports; :mod:`tokenforge.run`) and ``tune attention`` (kernel configs
chosen ahead of time, on a GPU, into the on-disk cache that training reads)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Optional


def _versions() -> dict:
    import torch

    out = {
        "tokenforge": __import__("tokenforge").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:
        out["triton"] = None
        out["triton_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _gpus() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({
            "index": i,
            "name": p.name,
            "capability": f"sm_{p.major}{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "sms": p.multi_processor_count,
        })
    return gpus


def _op_backends(device_type: str) -> list[dict]:
    """For each registered op: the backend a typical bf16/fp32 call would use on device_type, and why."""
    import torch

    from tokenforge import backends, fp8, ops, optim  # noqa: F401  (importing them registers their ops)

    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    rows = []
    for op in backends.registered_ops():
        entry = {"op": op, "device": device_type, "dtype": str(dtype).replace("torch.", ""),
                 "backends": backends.op_backends(op), "unavailable": {}}
        inputs = backends.example_inputs(op, device_type, dtype)
        if inputs is None:
            entry["backend"], entry["why"] = "?", "the op registered no example inputs to decide with"
            rows.append(entry)
            continue
        try:
            entry["backend"], entry["why"] = backends.explain(op, *inputs)
        except Exception as exc:  # a forced backend that cannot run: say so, don't crash info
            entry["backend"], entry["why"] = "error", str(exc)
        reasons = {b: backends.why_not(op, b, *inputs) for b in backends.op_backends(op)}
        entry["unavailable"] = {b: r for b, r in reasons.items() if r is not None}
        rows.append(entry)
    return rows


def collect_info() -> dict:
    """Everything ``tokenforge info`` reports, as a JSON-able dict."""
    from tokenforge import backends
    from tokenforge import cuda as cuda_ext

    gpus = _gpus()
    info = {
        "versions": _versions(),
        "platform": platform.platform(),
        "gpus": gpus,
        "triton_interpret": backends.interpreter_requested(),
        "forced_backend": os.environ.get(backends.ENV_VAR) or None,
        "extension": cuda_ext.extension_status(),
        "ops": _op_backends("cpu") + (_op_backends("cuda") if gpus else []),
    }
    return info


def _print_info(info: dict) -> None:
    v = info["versions"]
    print(f"tokenforge {v['tokenforge']}")
    print(f"  python {v['python']}  torch {v['torch']} (CUDA {v['torch_cuda'] or 'none: CPU build'})  "
          f"triton {v['triton'] or 'not importable: ' + v.get('triton_error', '')}")
    print(f"  platform {info['platform']}")
    if info["gpus"]:
        for g in info["gpus"]:
            print(f"  GPU {g['index']}: {g['name']} ({g['capability']}, {g['memory_gib']} GiB, {g['sms']} SMs)")
    else:
        print("  GPU: none visible to torch")
    print(f"  TRITON_INTERPRET: {'on' if info['triton_interpret'] else 'off'}"
          f"   TOKENFORGE_BACKEND: {info['forced_backend'] or 'unset (auto)'}")
    ext = info["extension"]
    if ext["available"]:
        b = ext.get("build_info") or {}
        archs = b.get("cuda_archs") or b.get("archs")
        print(f"  CUDA extension tokenforge._C: built" + (f" for {archs}" if archs else ""))
        if not ext.get("gpu_usable", False):
            print(f"    but cannot run here: {ext.get('gpu_reason', 'no CUDA device')}")
    else:
        print(f"  CUDA extension tokenforge._C: absent: {ext['reason']}")
    print()
    width = max([len("op")] + [len(row["op"]) for row in info["ops"]])
    print(f"  {'op':<{width}} {'device':<7} {'dtype':<9} {'backend':<8} why")
    for row in info["ops"]:
        print(f"  {row['op']:<{width}} {row['device']:<7} {row['dtype']:<9} {row['backend']:<8} {row['why']}")
        for b, reason in row["unavailable"].items():
            print(f"  {'':<{width}}   not {b}: {reason}")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        # Its own parser: everything after the script belongs to the script, options included.
        from tokenforge import run

        return run.main(argv[1:])
    parser = argparse.ArgumentParser(prog="tokenforge", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run an unmodified training script with tokenforge's kernels installed "
                   "(tokenforge run [--kernels ...] [--report FILE.json] script.py [args...])", add_help=False)
    p_info = sub.add_parser("info", help="versions, GPU, extension status and the backend each op uses")
    p_info.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    from tokenforge import cost, train

    p_train = sub.add_parser("train", help="train the reference transformer: kernels on/off, --compare, --resume, "
                             "torchrun --dist ddp|fsdp", description=train.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(p_train)
    p_cost = sub.add_parser("cost", help="GPU-hours, days and dollars to train a model; --seed-table",
                            description=cost.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cost.add_arguments(p_cost)
    p_tune = sub.add_parser("tune", help="choose kernel configs ahead of time (on a GPU) for the on-disk cache")
    tune_sub = p_tune.add_subparsers(dest="target")
    p_attn = tune_sub.add_parser("attention", help="time the attention kernels' candidate tiles for one shape")
    p_attn.add_argument("--batch", type=int, default=1)
    p_attn.add_argument("--seqlen", type=int, default=4096)
    p_attn.add_argument("--heads", type=int, default=32)
    p_attn.add_argument("--kv-heads", type=int, help="default: --heads (no GQA)")
    p_attn.add_argument("--head-dim", type=int, default=128)
    p_attn.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p_attn.add_argument("--no-causal", action="store_true", help="full (bidirectional) attention")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "info":
        info = collect_info()
        if args.json:
            json.dump(info, sys.stdout, indent=2, default=str)
            print()
        else:
            _print_info(info)
        return 0
    if args.command == "train":
        return train.run_cli(args)
    if args.command == "cost":
        return cost.run_cli(args)
    if args.command == "tune":
        return _tune(args, p_tune)
    return 2


def _tune(args, parser) -> int:
    """`tokenforge tune attention ...`: one line and exit status 2 for anything the user can fix."""
    if args.target != "attention":
        parser.print_help()
        return 2
    try:
        import torch

        from tokenforge.kernels import attention as kernels_attention
        from tokenforge.ops.attention import tune

        for name in ("batch", "seqlen", "heads", "head_dim"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        kv = args.kv_heads or args.heads
        if kv < 1 or args.heads % kv:
            raise ValueError(f"--heads {args.heads} must be a multiple of --kv-heads {kv}")
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
        chosen = tune(args.batch, args.seqlen, args.heads, kv, args.head_dim, dtype, causal=not args.no_causal)
    except (ValueError, RuntimeError) as exc:
        print(f"tokenforge tune: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    for key, cfg in chosen.items():
        print(f"  {key[0]:<16} {cfg}")
    print(f"wrote {kernels_attention.cache_path()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
