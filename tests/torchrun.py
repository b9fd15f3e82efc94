"""Launch 2 (or n) gloo ranks on 127.0.0.1 for the distributed tests (a module of its own, as
device_params: shared by test files, never a test itself)."""

import os
import socket
import subprocess
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(target: list, nproc: int = 2, timeout: int = 300) -> str:
    """Run ``python -m torch.distributed.run ... *target`` (a script and its arguments, or
    ``-m module ...``) with one thread per rank; returns stdout, fails with both tails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def run_worker(name: str, *args: str, nproc: int = 2, timeout: int = 300) -> str:
    """torchrun tests/<name> with ``args``."""
    return torchrun([os.path.join(TESTS_DIR, name), *args], nproc=nproc, timeout=timeout)
