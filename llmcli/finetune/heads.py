"""Classification: a linear head on BERT's pooled [CLS] or GPT's last token, and the loss and accuracy.

T5 classifies text-to-text (the label string is the decoder target), so it needs no head; its accuracy
scores every label string and picks the most likely one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.models.base import LanguageModel, ModelOutput
from llmcli.runtime import autocast, family_loss, model_outputs, perplexity


def language_model(model: nn.Module) -> LanguageModel:
    """The LanguageModel inside the fine-tuning wrappers (Classifier, PromptTuned)."""
    while not isinstance(model, LanguageModel):
        model = model.model
    return model


class Classifier(nn.Module):
    """Class logits from one vector per sequence.

    BERT: the pooler output (tanh(W h_[CLS])), or the [CLS] hidden state for a model without a pooler.
    GPT: the hidden state of the last non-padding token, the only one that has seen the whole text.
    """

    def __init__(self, model: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.drop = nn.Dropout(self.config.dropout)
        weight = language_model(model).tok_emb.weight
        self.head = nn.Linear(self.config.d_model, num_labels, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.head.weight, 0.0, 0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> ModelOutput:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.model(input_ids, attention_mask=attention_mask, **extra)
        hidden = out.hidden_states
        if self.config.family == "bert":
            features = out.pooled if out.pooled is not None else hidden[:, 0]
        else:
            last = (attention_mask.sum(1) - 1 if attention_mask is not None
                    else torch.full((len(hidden),), hidden.shape[1] - 1, device=hidden.device))
            features = hidden[torch.arange(len(hidden), device=hidden.device), last.long()]
        return ModelOutput(logits=self.head(self.drop(features)), hidden_states=features)


def classify_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the class logits against the class index in batch['labels']."""
    return F.cross_entropy(model_outputs(model, batch).logits.float(), batch["labels"])


@torch.no_grad()
def classify_eval(model: nn.Module, batches: list[dict], device: torch.device, precision: str = "fp32") -> dict:
    """Mean cross-entropy and accuracy over the held-out examples."""
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            logits = model_outputs(model, batch).logits.float()
        loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        count += len(logits)
    model.train(was_training)
    return {"loss": loss / count, "accuracy": correct / count}


def text_to_text_eval(candidates: list[list[int]], decoder_start: int):
    """An eval function for T5 classification: loss on the label strings and accuracy by label scoring.

    Each example's prediction is the label whose token sequence (with </s>) has the highest
    log-likelihood; this never produces a string that is not a label, unlike free decoding.
    """

    @torch.no_grad()
    def evaluate(model: nn.Module, batches: list[dict], device: torch.device, precision: str = "fp32") -> dict:
        was_training = model.training
        model.eval()
        loss, tokens, correct, count = 0.0, 0, 0, 0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"] != -100).sum())
            with autocast(device, precision):
                loss += family_loss(model, batch).item() * n
                scores = torch.stack([_sequence_log_prob(model, batch, target, decoder_start)
                                      for target in candidates], dim=1)
            tokens += n
            correct += int((scores.argmax(1) == batch["class_index"]).sum())
            count += len(scores)
        model.train(was_training)
        mean = loss / tokens
        return {"loss": mean, "perplexity": perplexity(mean), "accuracy": correct / count}

    return evaluate


def _sequence_log_prob(model: nn.Module, batch: dict, target: list[int], decoder_start: int) -> torch.Tensor:
    """log p(target | input) for every row of the batch."""
    rows = batch["input_ids"].shape[0]
    labels = torch.tensor(target, device=batch["input_ids"].device).expand(rows, -1)
    start = torch.full((rows, 1), decoder_start, device=labels.device, dtype=labels.dtype)
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   decoder_input_ids=torch.cat([start, labels[:, :-1]], 1)).logits.float()
    return logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1).sum(1)
