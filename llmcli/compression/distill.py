"""`llmcli distill`: train a smaller student on a teacher's soft targets (Hinton et al. 2015).

loss = α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) · the family's own loss,
both over the positions the objective scores (every next token for GPT, the masked tokens for
BERT, the target tokens for T5). The T² keeps the soft-target gradients the same size as T varies.
The loop, data, checkpoints and resume are `llmcli train`'s.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcli.config import ModelConfig, resolve_config
from llmcli.errors import UserError

LAYER_KEY = re.compile(r"^(?P<stack>(?:encoder|decoder)\.blocks)\.(?P<index>\d+)\.(?P<rest>.+)$")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, vocab: int) -> torch.Tensor:
    """T² · KL(teacher ‖ student) at temperature T, averaged over scored positions (labels != -100).

    Only the first `vocab` logits (the tokenizer's) count: padded vocabularies may differ in size.
    """
    scored = labels != -100
    student = student_logits[scored][:, :vocab].float() / temperature
    teacher = teacher_logits[scored][:, :vocab].float() / temperature
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="sum")
    return kl * temperature**2 / max(int(scored.sum()), 1)


def distillation_loss(teacher: torch.nn.Module, alpha: float, temperature: float, vocab: int):
    """A Trainer loss_fn: α · KD + (1 − α) · cross-entropy, with the teacher frozen."""
    from llmcli.training.loop import model_outputs

    def loss_fn(student: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model_outputs(student, batch).logits
        labels = batch["labels"]
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        if alpha == 0:
            return ce
        teacher.to(logits.device)
        with torch.no_grad():
            teacher_logits = model_outputs(teacher, batch).logits
        return alpha * kd_loss(logits, teacher_logits, labels, temperature, vocab) + (1 - alpha) * ce

    return loss_fn


def half_depth(config: ModelConfig, layers: int | None) -> ModelConfig:
    """The teacher's config with fewer layers (default: half, rounded up) in every stack."""
    layers = layers or max(1, (config.n_layers + 1) // 2)
    if not 1 <= layers <= config.n_layers:
        raise UserError(f"--student-layers {layers} must be between 1 and the teacher's {config.n_layers}")
    decoder = None
    if config.n_decoder_layers is not None:
        decoder = max(1, round(config.n_decoder_layers * layers / config.n_layers))
    return dataclasses.replace(config, name=f"{config.name}-{layers}l", n_layers=layers, n_decoder_layers=decoder,
                               published_params=None, source=f"{config.name} with {layers} layers (distillation)")


def teacher_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Student layer i starts from teacher layer ⌊i · L_t / L_s⌋: every other layer at half depth."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def copy_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> int:
    """Initialise the student from the teacher: embeddings, norms, heads, and evenly spaced layers.

    Every student tensor must find a teacher tensor of the same shape (same width); returns how many
    tensors were copied.
    """
    teacher_state = teacher.state_dict()
    depth = _stack_depths(teacher_state)
    maps = {stack: teacher_layer_map(depth[stack], n) for stack, n in _stack_depths(student.state_dict()).items()
            if stack in depth}
    copied = {}
    for key, value in student.state_dict().items():
        match = LAYER_KEY.match(key)
        source = f"{match['stack']}.{maps[match['stack']][int(match['index'])]}.{match['rest']}" if match else key
        if source not in teacher_state or teacher_state[source].shape != value.shape:
            raise UserError(f"--init-from-teacher: the student's '{key}' {tuple(value.shape)} has no teacher tensor "
                            f"of that shape; the student must have the teacher's width (d_model, heads, d_ff)")
        copied[key] = teacher_state[source]
    student.load_state_dict(copied)
    return len(copied)


def _stack_depths(state: dict) -> dict[str, int]:
    """Blocks per stack ('decoder.blocks': 12, ...) from state-dict keys."""
    depths: dict[str, int] = {}
    for key in state:
        match = LAYER_KEY.match(key)
        if match:
            depths[match["stack"]] = max(depths.get(match["stack"], 0), int(match["index"]) + 1)
    return depths


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


def distill(teacher_ref: str, student_ref: str | None, data: str | None, out: str, given: dict,
            alpha: float = 0.5, temperature: float = 1.0, student_layers: int | None = None,
            init_from_teacher: bool = False, baseline: bool = False, resume: bool = False, force: bool = False,
            speed: bool = True, log=print) -> dict:
    """Distil `teacher_ref` (a model directory) into a student; returns a before/after report.

    With `baseline`, the same student (same init, data and steps) is also trained without the teacher
    into OUT/baseline, so the report shows what the teacher bought.
    """
    from llmcli.compression.report import REPORT_FILE, compare, full_precision_dir, snapshot
    from llmcli.model_dir import load_model, load_tokenizer, write_json
    from llmcli.training.evaluation import corpus_batches
    from llmcli.training.loop import resolve_device
    from llmcli.training.pretrain import TRAINING_FILE, pretrain

    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha {alpha} must be between 0 (no teacher) and 1 (soft targets only)")
    if temperature <= 0:
        raise UserError(f"--temperature {temperature} must be positive (1 = the teacher's own distribution)")
    run_dir = Path(out)
    if resume:
        saved = run_dir / TRAINING_FILE
        if not saved.is_file():
            raise UserError(f"{run_dir}: no run to resume (no {TRAINING_FILE}); drop --resume to start one")
        settings = json.loads(saved.read_text())
        teacher_ref = teacher_ref or settings["teacher"]
        alpha, temperature = settings["alpha"], settings["temperature"]
    if not teacher_ref:
        raise UserError("--teacher is required: the trained model directory to distil")
    teacher_dir = full_precision_dir(teacher_ref, "--teacher")
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

    def prepare(student: torch.nn.Module) -> None:
        if init_from_teacher:
            log(f"initialised {copy_from_teacher(student, teacher)} student tensors from the teacher")

    record = {"teacher": str(teacher_dir), "alpha": alpha, "temperature": temperature,
              "init_from_teacher": init_from_teacher}
    common = dict(config=None if student_dir else student_config, tokenizer_dir=teacher_dir,
                  prepare_model=prepare, log=log)
    label = student_ref or student_config.name
    log(f"distilling {teacher.config.name} ({teacher.num_parameters():,} parameters) into {student_config.name}, "
        f"α {alpha}, T {temperature}")
    summary = pretrain(label, data, out, given, resume=resume, force=force, record=record,
                       loss_fn=distillation_loss(teacher, alpha, temperature, vocab), **common)
    if summary["stopped_early"]:
        return {"summary": summary}

    saved = json.loads((run_dir / TRAINING_FILE).read_text())
    saved_args = saved["args"]  # the same validation batches as the run's own evaluation
    corpus = corpus_batches(teacher_dir, teacher.config, tokenizer, saved["data"], saved_args["seq_len"],
                            saved_args["eval_batches"], saved_args["batch_size"])
    device = resolve_device(saved_args["device"])
    student = load_model(run_dir, device=str(device))
    report = {"method": "distill", "teacher": str(teacher_dir), "student": student_config.name, "out": str(run_dir),
              "alpha": alpha, "temperature": temperature, "init_from_teacher": init_from_teacher,
              "steps": summary["step"], "before": snapshot(teacher.to(device), corpus.val, device, speed),
              "after": snapshot(student, corpus.val, device, speed)}
    report["change"] = compare(report["before"], report["after"])
    report["change"]["perplexity_ratio"] = report["after"]["perplexity"] / report["before"]["perplexity"]
    if baseline:
        log("training the same student without the teacher (the baseline)")
        plain = pretrain(label, data, str(run_dir / "baseline"), {**given, "seed": saved_args["seed"]}, force=True,
                         record={**record, "alpha": 0.0, "baseline_of": str(run_dir)},
                         loss_fn=distillation_loss(teacher, 0.0, temperature, vocab), **common)
        report["baseline"] = {"out": plain["run_dir"], "loss": plain["val_loss"], "perplexity": plain["val_perplexity"]}
    write_json(run_dir / REPORT_FILE, report)
    return report

