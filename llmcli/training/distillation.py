"""Distillation's part of the training loop (Hinton et al. 2015): the soft-target loss and the teacher's
layers as the student's starting point. `llmcli distill` (llmcli.compression.distill) builds the spec.

loss = α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) · the family's own loss,
both over the positions the objective scores (every next token for GPT, the masked tokens for
BERT, the target tokens for T5). The T² keeps the soft-target gradients the same size as T varies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcli.errors import UserError
from llmcli.models.layout import split_block_name, stack_depths
from llmcli.runtime import model_outputs, token_cross_entropy


@dataclass
class Distillation:
    """What distillation adds to pre-training: a frozen teacher and the weight of its soft targets."""

    teacher: torch.nn.Module
    teacher_dir: Path
    alpha: float
    temperature: float
    vocab: int  # the shared tokenizer's size: only these logits are compared
    init_from_teacher: bool = False  # a new student starts from the teacher's embeddings, heads and layers
    extra_record: dict = field(default_factory=dict)  # more for training.json

    def record(self) -> dict:
        """What training.json keeps, so that a resume uses the same teacher and loss."""
        return {"teacher": str(self.teacher_dir), "alpha": self.alpha, "temperature": self.temperature,
                "init_from_teacher": self.init_from_teacher, **self.extra_record}

    def loss(self, student: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A Trainer loss_fn: α · KD + (1 − α) · cross-entropy, with the teacher frozen."""
        logits = model_outputs(student, batch).logits
        labels = batch["labels"]
        ce = token_cross_entropy(logits, labels)
        if self.alpha == 0:
            return ce
        self.teacher.to(logits.device)
        with torch.no_grad():
            teacher_logits = model_outputs(self.teacher, batch).logits
        soft = kd_loss(logits, teacher_logits, labels, self.temperature, self.vocab)
        return self.alpha * soft + (1 - self.alpha) * ce


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


def teacher_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Student layer i starts from teacher layer ⌊i · L_t / L_s⌋: every other layer at half depth."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def copy_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> int:
    """Initialise the student from the teacher: embeddings, norms, heads, and evenly spaced layers.

    Every student tensor must find a teacher tensor of the same shape (same width); returns how many
    tensors were copied.
    """
    teacher_state = teacher.state_dict()
    depth = stack_depths(teacher_state)
    maps = {stack: teacher_layer_map(depth[stack], n) for stack, n in stack_depths(student.state_dict()).items()
            if stack in depth}
    copied = {}
    for key, value in student.state_dict().items():
        parts = split_block_name(key)
        source = f"{parts[0]}.{maps[parts[0]][parts[1]]}.{parts[2]}" if parts else key
        if source not in teacher_state or teacher_state[source].shape != value.shape:
            raise UserError(f"--init-from-teacher: the student's '{key}' {tuple(value.shape)} has no teacher tensor "
                            f"of that shape; the student must have the teacher's width (d_model, heads, d_ff)")
        copied[key] = teacher_state[source]
    student.load_state_dict(copied)
    return len(copied)
