"""`llmcli distill`: train a smaller student on a teacher's soft targets (Hinton et al. 2015).

The student and its checks are chosen here; the loss (α · T² · KL + (1 − α) · the family's loss) and the
copying of teacher layers are llmcli.training.distillation; the loop, data, checkpoints and resume are
`llmcli train`'s.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from llmcli.compression.directories import REPORT_FILE, full_precision_dir
from llmcli.compression.snapshot import compare, snapshot
from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.model_dir import check_outside, load_model, load_tokenizer, resolve_config, write_json
from llmcli.progress import SILENT, Progress
from llmcli.runtime import resolve_device
from llmcli.training.distillation import Distillation, teacher_layer_map
from llmcli.training.evaluation import corpus_batches
from llmcli.training.pretrain import pretrain
from llmcli.training.run import TrainFlags, read_run


def half_depth(config: ModelConfig, layers: int | None) -> ModelConfig:
    """The teacher's config with fewer layers (default: half, rounded up) in every stack."""
    layers = layers or max(1, (config.n_layers + 1) // 2)
    if not 1 <= layers <= config.n_layers:
        raise UserError(f"--student-layers {layers} must be between 1 and the teacher's {config.n_layers}")
    decoder = None
    if config.n_decoder_layers is not None:
        decoder = max(1, round(config.n_decoder_layers * layers / config.n_layers))
    # per-layer choices (windows, NoPE) follow the layer each student layer starts from
    taken = teacher_layer_map(config.n_layers, layers)
    layer_types = [config.layer_types[t] for t in taken] if config.layer_types else None
    nope = [i for i, t in enumerate(taken) if t in config.nope_layers] if config.nope_layers else None
    return dataclasses.replace(config, name=f"{config.name}-{layers}l", n_layers=layers, n_decoder_layers=decoder,
                               layer_types=layer_types, nope_layers=nope or None, published_params=None,
                               source=f"{config.name} with {layers} layers (distillation)")


def check_pair(teacher_config: ModelConfig, student_config: ModelConfig, teacher_dir: Path,
               student_dir: Path | None, vocab: int) -> None:
    if teacher_config.family != student_config.family:
        raise UserError(f"teacher {teacher_config.name} is {teacher_config.family} and student {student_config.name} "
                        f"is {student_config.family}; distillation needs one family (the same objective and outputs)")
    if student_config.vocab_size < vocab:
        raise UserError(f"student {student_config.name} has vocab_size {student_config.vocab_size}, the teacher's "
                        f"tokenizer {vocab} tokens; give the student a vocab_size of at least {vocab}")
    if student_dir is not None and (student_dir / "tokenizer.json").is_file():
        ours = json.loads((student_dir / "tokenizer.json").read_text()).get("model", {}).get("vocab")
        theirs = json.loads((teacher_dir / "tokenizer.json").read_text()).get("model", {}).get("vocab")
        if ours != theirs:
            raise UserError(f"{student_dir}: its tokenizer differs from the teacher's ({teacher_dir}); teacher and "
                            f"student must share one tokenizer (start the student from a zoo name or TOML instead)")


def distill(teacher_ref: str | None, student_ref: str | None, data: str | None, out: str, flags: TrainFlags,
            alpha: float = 0.5, temperature: float = 1.0, student_layers: int | None = None,
            init_from_teacher: bool = False, baseline: bool = False, speed: bool = True, *, log: Callable = print,
            progress: Progress = SILENT) -> dict:
    """Distil `teacher_ref` (a model directory) into a student; returns a before/after report.

    With `baseline`, the same student (same init, data and steps) is also trained without the teacher
    into OUT/baseline, so the report shows what the teacher bought.
    """
    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha {alpha} must be between 0 (no teacher) and 1 (soft targets only)")
    if temperature <= 0:
        raise UserError(f"--temperature {temperature} must be positive (1 = the teacher's own distribution)")
    run_dir = Path(out)
    if flags.resume:
        settings = read_run(run_dir)
        teacher_ref = teacher_ref or settings["teacher"]
        alpha, temperature = settings["alpha"], settings["temperature"]
    if not teacher_ref:
        raise UserError("--teacher is required: the trained model directory to distil")
    teacher_dir = full_precision_dir(teacher_ref, "--teacher")
    check_outside(teacher_dir, run_dir)
    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir)
    teacher.requires_grad_(False)
    vocab = tokenizer.get_vocab_size()

    if student_ref is not None and student_layers is not None:
        raise UserError("give either --student or --student-layers, not both")
    if student_ref is None:
        student_config, student_dir = half_depth(teacher.config, student_layers), None
    else:
        student_config, student_dir = resolve_config(student_ref)
    check_pair(teacher.config, student_config, teacher_dir, student_dir, vocab)

    student = student_ref if student_ref is not None else student_config  # a directory's weights are the start
    spec = Distillation(teacher, teacher_dir, alpha, temperature, vocab, init_from_teacher)
    log(f"distilling {teacher.config.name} ({teacher.num_parameters():,} parameters) into {student_config.name}, "
        f"α {alpha}, T {temperature}")
    summary = pretrain(student, data, out, flags, log=log, progress=progress, tokenizer_dir=teacher_dir,
                       distillation=spec)
    if summary["stopped_early"]:
        return {"summary": summary}

    saved = read_run(run_dir)
    saved_args = saved["args"]  # the same validation batches as the run's own evaluation
    corpus = corpus_batches(teacher_dir, teacher.config, tokenizer, saved["data"], saved_args["seq_len"],
                            saved_args["eval_batches"], saved_args["batch_size"])
    device = resolve_device(saved_args["device"])
    trained = load_model(run_dir, device=str(device))
    report = {"method": "distill", "teacher": str(teacher_dir), "student": student_config.name, "out": str(run_dir),
              "alpha": alpha, "temperature": temperature, "init_from_teacher": init_from_teacher,
              "steps": summary["step"], "before": snapshot(teacher.to(device), corpus.val, device, speed),
              "after": snapshot(trained, corpus.val, device, speed)}
    report["change"] = compare(report["before"], report["after"])
    report["change"]["perplexity_ratio"] = report["after"]["perplexity"] / report["before"]["perplexity"]
    if baseline:
        log("training the same student without the teacher (the baseline)")
        plain_spec = dataclasses.replace(spec, alpha=0.0, extra_record={"baseline_of": str(run_dir)})
        plain = pretrain(student, data, str(run_dir / "baseline"),
                         flags.replace(seed=saved_args["seed"], resume=False, force=True), log=log,
                         progress=progress, tokenizer_dir=teacher_dir, distillation=plain_spec)
        report["baseline"] = {"out": plain["run_dir"], "loss": plain["val_loss"], "perplexity": plain["val_perplexity"]}
    write_json(run_dir / REPORT_FILE, report)
    return report
