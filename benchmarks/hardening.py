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
    from test_faults import RUNS, WRITERS

    # writers: Ctrl-C half way through writing, SIGKILL just before the swap (tokenizer, a first output: one
    # SIGKILL while writing); runs: SIGKILL half way through a checkpoint and again through the final export;
    # train: one Ctrl-C; scaling sweep: one SIGKILL and one Ctrl-C during its second run.
    interrupts = len(WRITERS) - 1 + 1 + 1
    kills = len(WRITERS) + 2 * len(RUNS) + 1
    lines = [header("Issue 17: bad input and faults"),
             f"`python benchmarks/hardening.py`: {summary}\n",
             "| command | bad inputs |", "|---|---:|",
             *[f"| {command} | {n} |" for command, n in sorted(per_command.items())],
             f"| **all** | **{len(CASES)}** |", "",
             f"Each bad input: exit code 2, one `error:` line, no traceback, every input file hashed before and "
             f"after. Failed cases (inputs changed, partial outputs, tracebacks): {len(failed)}"
             f"{' - ' + ', '.join(failed) if failed else ''}.",
             f"Faults: {kills + interrupts} processes stopped at deterministic points, {kills} by SIGKILL and "
             f"{interrupts} by Ctrl-C (SIGINT). Writers ({', '.join(WRITERS)}): Ctrl-C with the new output half "
             f"written, SIGKILL just before it replaces the old one (tokenizer, a first output: SIGKILL while "
             f"writing). Runs ({', '.join(RUNS)}): SIGKILL half way "
             f"through the second checkpoint, resumed, SIGKILL half way through the final export, resumed again. "
             f"train: Ctrl-C, then a resume. scaling sweep: SIGKILL and Ctrl-C during its second run, then the "
             f"same command again. Also a disk-full error injected while quantize replaces an output and while a "
             f"run checkpoints, and a second writer of an output that another process holds. Partial outputs "
             f"left: {sum('kill' in f or 'sweep' in f for f in failed)}; resumes not bit-identical: "
             f"{sum('ctrl_c' in f or 'run_killed' in f for f in failed)}."]
    record("\n".join(lines), args.no_record)
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
