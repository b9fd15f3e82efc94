"""Test setup: Triton's interpreter on machines without a GPU, device parametrisation.

Triton decides whether a kernel is compiled or interpreted when ``tokenforge.kernels`` is first
imported, so TRITON_INTERPRET must be set here, before any test module imports it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton>=3.9's notice; same codegen

from tokenforge.testing import keep_checkout_off_sys_path  # noqa: E402  (imports tokenforge.kernels)

keep_checkout_off_sys_path()  # before anything imports transformers (see its docstring)

import pytest  # noqa: E402

from device_params import HAS_CUDA  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # Compile-gate tests need a compiling (not interpreted) triton; in an interpreted process
    # test_compile_gate.py::test_gate_in_compiling_process runs them in a child process instead.
    from tokenforge import kernels

    if not kernels.INTERPRETED:
        return
    skip = pytest.mark.skip(reason="compile gate: runs in a compiling child process (test_gate_in_compiling_process)")
    for item in items:
        if "compile_gate" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    if HAS_CUDA:
        return f"tokenforge: CUDA tests run on {torch.cuda.get_device_name(0)}"
    return ("tokenforge: no CUDA GPU: CUDA tests are skipped; Triton kernels run under "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} on CPU tensors")


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs every run (never zeros); the seed shows in a failing test's captured
    # stdout, so a failure can be replayed: TOKENFORGE_TEST_SEED=<seed> pytest <that test>.
    replay = os.environ.get("TOKENFORGE_TEST_SEED")
    seed = int(replay) if replay else int.from_bytes(os.urandom(4), "little")
    print(f"torch.manual_seed({seed})")
    torch.manual_seed(seed)
    yield seed
