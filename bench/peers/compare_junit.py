"""Which peer tests fail with tokenforge's ops but pass with the peer's own kernels on the same machine.

    python bench/peers/compare_junit.py OURS.xml BASELINE.xml

OURS.xml and BASELINE.xml are the JUnit files run_peer_tests.sh writes (liger.xml and, with
PEER_BASELINE=1, liger-baseline.xml). A failure both runs share with the same exception type belongs
to the machine or the test (the interpreter's bf16 truncation, a reference less accurate than the
tolerance), not to our ops. One where the exception types differ (the peer's kernel could not even
run here, say) proves nothing and is listed to be looked at by hand.
Prints the counts of each run, one line per test that fails only with ours (exit 1 if any) and one
per failure shared for different reasons.
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def outcomes(path: str) -> tuple[dict[str, str], dict[str, str]]:
    """(test id -> passed / failed / skipped, test id -> the failure's exception type), from a pytest
    JUnit XML file."""
    result, errors = {}, {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        if failure is not None:
            result[test_id] = "failed"
            first_line = (failure.get("message") or "").strip().split("\n", 1)[0]
            errors[test_id] = first_line.split(":", 1)[0].strip()  # "ValueError: ..." or "assert ..."
        elif case.find("skipped") is not None:
            result[test_id] = "skipped"
        else:
            result[test_id] = "passed"
    return result, errors


def counts(result: dict[str, str]) -> str:
    return ", ".join(f"{sum(v == k for v in result.values())} {k}" for k in ("passed", "failed", "skipped"))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    (ours, our_errors), (baseline, base_errors) = outcomes(argv[0]), outcomes(argv[1])
    print(f"ours:     {counts(ours)}")
    print(f"baseline: {counts(baseline)}")
    only_ours = sorted(t for t, v in ours.items() if v == "failed" and baseline.get(t) == "passed")
    both = [t for t, v in ours.items() if v == "failed" and baseline.get(t) == "failed"]
    differ = sorted(t for t in both if our_errors[t] != base_errors[t])
    not_in_baseline = sum(v == "failed" and t not in baseline for t, v in ours.items())
    print(f"failed with both, same exception type: {len(both) - len(differ)}; "
          f"failed with ours, not run by the baseline: {not_in_baseline}")
    print(f"failed with both, different exception types (look by hand): {len(differ)}")
    for test_id in differ:
        print(f"  {test_id}: ours {our_errors[test_id]} / baseline {base_errors[test_id]}")
    print(f"failed only with ours: {len(only_ours)}")
    for test_id in only_ours:
        print(f"  {test_id}")
    return 1 if only_ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
