"""Launch 2 (or n) gloo ranks on 127.0.0.1 for the distributed tests (a module of its own, as
device_params: shared by test files, never a test itself)."""

import os
import signal
import socket
import subprocess
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A rank killed by std::terminate inside gloo's C++ threads, with no Python error before it: seen
# twice (2026-12-03) in fresh-clone CI runs of tests/fsdp_fp8_worker.py, each time while other
# heavy processes (nvcc, another pytest) shared the 2 cores; never reproduced in 18 reruns of the
# worker alone, with and without an artificial CPU load. Root cause unknown. One retry of exactly
# this signature keeps CI from flaking on it; any other failure, or the same one twice, fails.
GLOO_ABORT = "terminate called without an active exception"


def torchrun(target: list, nproc: int = 2, timeout: int = 300) -> str:
    """Run ``python -m torch.distributed.run ... *target`` (a script and its arguments, or
    ``-m module ...``) with one thread per rank; returns stdout, fails with both tails."""
    for attempt in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target]
        # cwd: tests/, not the checkout root, which ``-m`` would put on the ranks' sys.path, where
        # its kernels/ folder shadows Hugging Face's kernels package (tokenforge.testing.keep_checkout_off_sys_path).
        proc = _run_as_group(cmd, timeout, cwd=TESTS_DIR, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode == 0 or GLOO_ABORT not in proc.stderr or attempt == 2:
            break
        print(f"torchrun: a rank aborted in gloo ({GLOO_ABORT!r}); retrying once:\n{proc.stderr[-1500:]}",
              file=sys.stderr)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _run_as_group(cmd: list, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) that stops the ranks too on a timeout. torchrun starts each rank in a
    session of its own, so subprocess.run's SIGKILL of torchrun alone left hung ranks running (and
    holding the output pipes: the test then waited for them to finish). SIGTERM lets torchrun stop
    its ranks; if it does not exit, its own process group is killed. Then the test fails with both tails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        raise AssertionError(f"torchrun timed out after {timeout} s (stopped, ranks and all):\n{out[-3000:]}\n"
                             f"{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_worker(name: str, *args: str, nproc: int = 2, timeout: int = 300) -> str:
    """torchrun tests/<name> with ``args``."""
    return torchrun([os.path.join(TESTS_DIR, name), *args], nproc=nproc, timeout=timeout)


def write_per_rank(result, path: str) -> None:
    """The end of a worker: every rank's ``result`` gathered to rank 0, written there as a JSON list
    (one entry per rank); then a barrier, so no rank tears the group down while another still uses
    it (gloo can hang), and the group is destroyed."""
    import json

    import torch.distributed as dist

    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, result)
    if dist.get_rank() == 0:
        with open(path, "w") as fh:
            json.dump(per_rank, fh)
    dist.barrier()
    dist.destroy_process_group()
