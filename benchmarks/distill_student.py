"""Distillation on the default corpus: a half-depth student with and without its teacher, same steps.

Trains the teacher (`llmcli train MODEL`, default flags) unless --teacher names a finished run, then the
half-depth student four ways, all for the same steps on the same batches: distilled and plain, each
from a fresh init and from every other teacher layer. Issue-8 goal: the distilled student's perplexity is
at most 1.3x the teacher's and below the plain student's. Usage:
    python benchmarks/distill_student.py [--model gpt-micro] [--teacher DIR] [--steps 400] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import header, record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt-micro")
    parser.add_argument("--teacher", help="a finished `llmcli train` run to use as the teacher")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: train's default)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--work", default="runs/bench-distill")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from llmcli.compression.distill import distill
    from llmcli.training.pretrain import pretrain
    from llmcli.training.run import TrainFlags

    work = Path(args.work)
    teacher = args.teacher or str(work / "teacher")
    if args.teacher is None:
        pretrain(args.model, None, teacher, TrainFlags(force=True), log=lambda *a, **k: None)
    flags = TrainFlags(steps=args.steps or None, force=True)
    rows = []
    for init in (False, True):
        out = work / ("student-init" if init else "student-fresh")
        report = distill(teacher, None, None, str(out), flags, alpha=args.alpha, temperature=args.temperature,
                         init_from_teacher=init, baseline=True, speed=False, log=lambda *a, **k: None)
        rows.append((init, report))

    teacher_ppl = rows[0][1]["before"]["perplexity"]
    lines = [header(f"Distillation: {args.model} teacher -> half-depth student, default corpus (CPU)"),
             f"Teacher {teacher} ({rows[0][1]['before']['params']:,} parameters), validation perplexity "
             f"**{teacher_ppl:.2f}**; student {rows[0][1]['student']} ({rows[0][1]['after']['params']:,} parameters), "
             f"{rows[0][1]['steps']} steps, α {args.alpha}, T {args.temperature}. The plain student is the same "
             f"student (same init, batches and steps) trained on the family loss alone.\n",
             "| student init | distilled ppl | plain ppl | distilled / teacher | distilled < plain |",
             "|---|---:|---:|---:|---|"]
    for init, report in rows:
        distilled, plain = report["after"]["perplexity"], report["baseline"]["perplexity"]
        lines.append(f"| {'every other teacher layer' if init else 'fresh (seed 0)'} | {distilled:.2f} | {plain:.2f} | "
                     f"{distilled / teacher_ppl:.2f}× | {'yes' if distilled < plain else 'no'} |")
    lines.append(f"\n`python benchmarks/distill_student.py --model {args.model}`"
                 + (f" --steps {args.steps}" if args.steps else ""))
    record("\n".join(lines), args.no_record)


if __name__ == "__main__":
    main()
