"""Tokens to a target loss, Muon vs AdamW, on the CPU: the measurement behind issue 15's claim
that Muon needs fewer tokens, at a size CI-class machines can run.

    python bench/muon_vs_adamw.py --out bench/results/<date>-cpu/muon_vs_adamw [--steps 600]

1. LR sweep: ``tokenforge train`` (tiny preset, embedded corpus, same seed and batches) for each
   optimizer and each learning rate of its sweep, --max-steps STEPS; the final val loss ranks them.
2. The target is the val loss AdamW reaches at the end of the budget with its best learning rate.
3. Muon (best learning rate, same schedule length) runs with ``--target-loss`` set to that value:
   the steps (= tokens, same batch) it takes are the result; AdamW's own steps-to-target are
   measured the same way. Whatever the ratio is, it is reported.

Writes OUT.json (every run's final val loss and curve) and OUT.md (the tables). CPU wall times are
in the JSON but say nothing about a GPU: the ratio that carries over is tokens-to-target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from tokenforge import train

ADAMW_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
MUON_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def run(optimizer: str, lr: float, steps: int, eval_every: int, target=None, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "run.json")
        argv = ["--preset", "tiny", "--kernels", "off", "--optimizer", optimizer, "--lr", str(lr),
                "--max-steps", str(steps), "--eval-every", str(eval_every), "--eval-iters", "8",
                "--seed", str(seed), "--progress", "none", "--json", path]
        if target is not None:
            argv += ["--target-loss", repr(target)]
        rc = train.main(argv)
        if rc != 0:
            raise SystemExit(f"muon_vs_adamw: tokenforge train {' '.join(argv)} exited {rc}")
        with open(path) as f:
            out = json.load(f)
    row = out["rows"][0]
    return {"optimizer": optimizer, "lr": lr, "steps": row["steps"], "final_val_loss": out["val_losses"][-1][1],
            "val_losses": out["val_losses"], "train_seconds": row["train_seconds"], "target": row["target"],
            "tokens_per_s": row["tokens_per_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="path prefix: writes OUT.json and OUT.md")
    p.add_argument("--steps", type=int, default=600, help="the fixed budget (optimizer steps)")
    p.add_argument("--eval-every", type=int, default=25)
    args = p.parse_args(argv)

    sweep = {"adamw": [run("adamw", lr, args.steps, args.eval_every) for lr in ADAMW_LRS],
             "muon": [run("muon", lr, args.steps, args.eval_every) for lr in MUON_LRS]}
    best = {k: min(v, key=lambda r: r["final_val_loss"]) for k, v in sweep.items()}
    target = best["adamw"]["final_val_loss"]
    to_target = {k: run(k, best[k]["lr"], args.steps, args.eval_every, target=target) for k in ("adamw", "muon")}
    steps = {k: (v["target"]["step"] if v["target"] else None) for k, v in to_target.items()}
    ratio = steps["muon"] / steps["adamw"] if steps["muon"] and steps["adamw"] else None

    result = {"preset": "tiny", "budget_steps": args.steps, "eval_every": args.eval_every, "sweep": sweep,
              "target_val_loss": target, "to_target": to_target, "steps_to_target": steps,
              "muon_over_adamw_tokens_to_target": ratio, "python": sys.version.split()[0]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# Muon vs AdamW, tokens to a target val loss (tiny preset, CPU, {args.steps}-step budget)", "",
             "Command: `python bench/muon_vs_adamw.py --out " + args.out + f" --steps {args.steps}`", "",
             "## LR sweep (final val loss after the budget; same seed, batches, warmup + cosine schedule)", "",
             "| optimizer | lr | final val loss |", "| --- | --- | --- |"]
    for k, runs in sweep.items():
        for r in runs:
            mark = " (best)" if r is best[k] else ""
            lines.append(f"| {k} | {r['lr']:g} | {r['final_val_loss']:.4f}{mark} |")
    lines += ["", f"Target: AdamW's best final val loss, {target:.4f}.", "",
              "| optimizer | lr | steps to target | tokens to target | CPU training s |", "| --- | --- | --- | --- | --- |"]
    for k, r in to_target.items():
        t = r["target"]
        if t:
            lines.append(f"| {k} | {r['lr']:g} | {t['step']} | {t['tokens']:,} | {t['train_seconds']:.1f} |")
        else:
            lines.append(f"| {k} | {r['lr']:g} | not reached in {r['steps']} | - | - |")
    verdict = (f"Muon / AdamW tokens to target: {ratio:.2f}x" if ratio else
               "Muon / AdamW: not comparable (a run did not reach the target)")
    lines += ["", verdict, "",
              "CPU seconds include Newton-Schulz run by torch on the CPU; they do not predict a GPU's."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
