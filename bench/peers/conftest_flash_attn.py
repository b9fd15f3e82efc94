"""conftest for flash_attn's tests/test_flash_attn.py as run_peer_tests.sh runs it against tokenforge.

flash_attn's suite has about half a million cases; PEER_SAMPLE=N keeps a random N of the selected
ones (PEER_SEED picks them), so a run fits a budget and a different seed covers different cases.
Most of the cases belong to two test functions (test_flash_attn_output, test_flash_attn_varlen_output),
so a plain sample rarely reaches the others: PEER_SAMPLE_PER_TEST=N instead keeps a random N cases of
every test function (all of those with fewer).
PEER_MAX_SEQLEN=L first drops cases whose seqlen / seqlen_q / seqlen_k parameter is above L (the
runner sets 256 without a GPU: the interpreter needs minutes for one 2048-token case).
Without a GPU the test file is run on CPU tensors (the runner rewrites its device) and asks for the
GPU's capability and memory at import time, so those two answer as an 80 GB sm_90 would.
TOKENFORGE_PEER_RNE_BF16=1 makes the interpreter round fp32 -> bf16 as a GPU does (interpreter_rne.py).
"""
import os
import random
import types

import pytest
import torch

if os.environ.get("TOKENFORGE_PEER_RNE_BF16"):
    import interpreter_rne  # noqa: F401

if not torch.cuda.is_available():
    torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)
    torch.cuda.get_device_properties = lambda *args, **kwargs: types.SimpleNamespace(total_memory=80 * 2**30)


def _longest_sequence(item) -> int:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return max((v for k, v in params.items() if k in ("seqlen", "seqlen_q", "seqlen_k") and isinstance(v, int)),
               default=0)


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected: sample what the user selected
def pytest_collection_modifyitems(config, items):
    longest = int(os.environ.get("PEER_MAX_SEQLEN", "0"))
    if longest > 0:
        too_long = [item for item in items if _longest_sequence(item) > longest]
        if too_long:
            config.hook.pytest_deselected(items=too_long)
            items[:] = [item for item in items if _longest_sequence(item) <= longest]
    rng = random.Random(int(os.environ.get("PEER_SEED", "0")))
    per_test = int(os.environ.get("PEER_SAMPLE_PER_TEST", "0"))
    keep = int(os.environ.get("PEER_SAMPLE", "0"))
    if per_test > 0:
        by_function: dict[str, list] = {}
        for item in items:
            by_function.setdefault(item.originalname, []).append(item)
        kept = []
        for cases in by_function.values():
            rng.shuffle(cases)
            kept += cases[:per_test]
    elif 0 < keep < len(items):
        rng.shuffle(items)
        kept = items[:keep]
    else:
        return
    kept_ids = {id(item) for item in kept}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
    items[:] = sorted(kept, key=lambda item: item.nodeid)
