"""Issue 17's figures: bad inputs tried per command, faults injected, and what the suites found, from a run of
tests/test_fuzz.py and tests/test_faults.py. Usage: python benchmarks/hardening.py [--no-record]
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from test_fuzz import CASES

    groups = ("zoo", "tokenizer", "convert", "scaling")  # commands with subcommands
    per_command = collections.Counter(f"{case[0]} {case[1]}" if case[0] in groups else case[0]
                                      for case in CASES.values())
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py",
                          "tests/test_faults.py", "-rA"], cwd=ROOT, capture_output=True, text=True)
    summary = run.stdout.strip().splitlines()[-1]
    failed = re.findall(r"^FAILED (\S+)", run.stdout, re.M)
    from test_faults import WRITERS

    fault_runs = 2 * len(WRITERS)  # two kills per writer but one for tokenizer (a first output), plus one Ctrl-C
    lines = [header("Issue 17: bad input and faults"),
             f"`python benchmarks/hardening.py`: {summary}\n",
             "| command | bad inputs |", "|---|---:|",
             *[f"| {command} | {n} |" for command, n in sorted(per_command.items())],
             f"| **all** | **{len(CASES)}** |", "",
             f"Each bad input: exit code 2, one `error:` line, no traceback, every input file hashed before and "
             f"after. Failed cases (inputs changed, partial outputs, tracebacks): {len(failed)}"
             f"{' - ' + ', '.join(failed) if failed else ''}.",
             f"Faults: {fault_runs} processes stopped (SIGKILL with the new output half written and again just before "
             f"it replaces the old one, for {', '.join(WRITERS)}; Ctrl-C during train), disk-full "
             f"injected while quantize replaces an output and while a run checkpoints, and a second "
             f"writer of an output that another process holds. Partial outputs left: "
             f"{sum('kill' in f or 'tokenizer' in f for f in failed)}; resumes not bit-identical: "
             f"{sum('ctrl_c' in f or 'checkpointing' in f for f in failed)}."]
    record("\n".join(lines), args.no_record)
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
