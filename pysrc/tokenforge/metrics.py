"""Training metrics: tokens/s, MFU, peak memory, $/M tokens, a JSONL log, progress and a plot.

MFU = flops_per_token x tokens/s / (GPUs x the GPU's dense bf16 peak) (tokenforge.cost.GPUS), the
PaLM convention: fp8 runs are measured against the bf16 peak too, so a faster recipe shows as a
higher MFU. A CPU (or an unlisted GPU) has no peak in the table: MFU is None there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import torch

from tokenforge.cost import match_gpu


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak FLOP/s of ``device`` from the cost table, None if it has none (CPU)."""
    if device.type != "cuda":
        return None
    gpu = match_gpu(torch.cuda.get_device_name(device))
    return gpu.bf16_flops if gpu else None


def default_price(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    gpu = match_gpu(torch.cuda.get_device_name(device))
    return gpu.price if gpu else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: the CUDA caching allocator's max allocated, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
    except Exception:
        return 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu(tokens_per_s: float, flops_per_token: float, peak: Optional[float], world: int = 1) -> Optional[float]:
    """Fraction of ``world`` GPUs' peak that ``tokens_per_s`` (all ranks together) represents."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * world)


def usd_per_mtok(tokens_per_s: float, price_per_gpu_hour: Optional[float], world: int = 1) -> Optional[float]:
    """Dollars per million tokens at ``price_per_gpu_hour`` for each of ``world`` GPUs."""
    if not price_per_gpu_hour or tokens_per_s <= 0:
        return None
    return price_per_gpu_hour * world / (tokens_per_s * 3600.0) * 1e6


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a crashed run keeps its metrics."""

    def __init__(self, path: str, append: bool = True):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._f = open(path, "a" if append else "w")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A live bar (tqdm, else rich) on a terminal; plain lines every ``every`` steps otherwise."""

    def __init__(self, total: int, initial: int = 0, mode: str = "auto", every: int = 10, desc: str = "train"):
        self.total, self.every, self.desc = total, max(1, every), desc
        self._bar = None
        self._rich = None
        self.mode = mode
        if mode == "auto":
            self.mode = "bar" if sys.stderr.isatty() else "plain"
        if self.mode == "bar":
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                try:
                    from rich.progress import Progress as RichProgress

                    self._rich = RichProgress(transient=False)
                    self._rich.start()
                    self._task = self._rich.add_task(desc, total=total, completed=initial)
                except ImportError:
                    self.mode = "plain"
        self._t0 = time.perf_counter()
        self._start_step = initial

    def update(self, step: int, stats: dict) -> None:
        text = ", ".join(f"{k} {v}" for k, v in stats.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)
        elif self._rich is not None:
            self._rich.update(self._task, advance=1, description=f"{self.desc} {text}")
        elif self.mode == "plain" and (step % self.every == 0 or step == self.total):
            done = step - self._start_step
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total}  {text}  eta {eta:.0f}s", flush=True)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        elif self.mode != "none":
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._rich is not None:
            self._rich.stop()


def plot(metrics_path: str, png_path: str) -> Optional[str]:
    """Loss and tokens/s against step from a metrics.jsonl into a PNG; returns why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot written"
    rows = [r for r in read_jsonl(metrics_path) if "loss" in r]
    val = [r for r in read_jsonl(metrics_path) if "val_loss" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in sorted({r.get("variant", "train") for r in rows}):
        sel = [r for r in rows if r.get("variant", "train") == variant]
        ax1.plot([r["step"] for r in sel], [r["loss"] for r in sel], label=variant)
        ax2.plot([r["step"] for r in sel], [r.get("tokens_per_s") or 0 for r in sel], label=variant)
    if val:
        ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", label="val")
    ax1.set_xlabel("step"); ax1.set_ylabel("loss"); ax1.legend()
    ax2.set_xlabel("step"); ax2.set_ylabel("tokens/s"); ax2.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return None
