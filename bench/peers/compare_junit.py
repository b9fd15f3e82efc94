"""Which peer tests fail with tokenforge's ops but pass with the peer's own kernels on the same machine.

    python bench/peers/compare_junit.py OURS.xml BASELINE.xml

OURS.xml and BASELINE.xml are the JUnit files run_peer_tests.sh writes (liger.xml and, with
PEER_BASELINE=1, liger-baseline.xml). A failure both runs share belongs to the machine or the test
(the interpreter's bf16 truncation, a reference less accurate than the tolerance), not to our ops.
Prints the counts of each run and one line per test that fails only with ours; exits 1 if any.
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def outcomes(path: str) -> dict[str, str]:
    """test id -> passed / failed / skipped, from a pytest JUnit XML file."""
    result = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            result[test_id] = "failed"
        elif case.find("skipped") is not None:
            result[test_id] = "skipped"
        else:
            result[test_id] = "passed"
    return result


def counts(result: dict[str, str]) -> str:
    return ", ".join(f"{sum(v == k for v in result.values())} {k}" for k in ("passed", "failed", "skipped"))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    ours, baseline = outcomes(argv[0]), outcomes(argv[1])
    print(f"ours:     {counts(ours)}")
    print(f"baseline: {counts(baseline)}")
    only_ours = sorted(t for t, v in ours.items() if v == "failed" and baseline.get(t) == "passed")
    both = sum(v == "failed" and baseline.get(t) == "failed" for t, v in ours.items())
    not_in_baseline = sum(v == "failed" and t not in baseline for t, v in ours.items())
    print(f"failed with both: {both}; failed with ours, not run by the baseline: {not_in_baseline}")
    print(f"failed only with ours: {len(only_ours)}")
    for test_id in only_ours:
        print(f"  {test_id}")
    return 1 if only_ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
