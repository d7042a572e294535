"""`llmcli finetune`: attach a method and a task to a trained model and run the shared training loop.

The run directory (OUT) follows `llmcli train`: training.json, metrics.jsonl, checkpoints/ and resume
come from llmcli.training. At the start OUT receives the base (config.json, tokenizer.json and
model.safetensors, hard-linked where the filesystem allows, else copied); at the end the adapter
(adapter/), the tuned weights for --method full, and for LoRA a PEFT export (peft/). Under torchrun
rank 0 alone writes OUT, and the exports are made from the full weights gathered to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from llmcli.chat_template import model_chat_template
from llmcli.errors import UserError
from llmcli.finetune.heads import language_model
from llmcli.finetune.lora import parse_targets
from llmcli.finetune.methods import METHODS, FinetuneSpec, attach, parameter_counts
from llmcli.finetune.peft_export import PEFT_DIR, export_peft, peft_blocker
from llmcli.finetune.saving import read_adapter_config, save_adapter
from llmcli.finetune.tasks import TASKS, build_task
from llmcli.interop.reading import is_hf_checkpoint
from llmcli.model_dir import (CONFIG_FILE, QUANTIZATION_FILE, TOKENIZER_FILE, WEIGHTS_FILE, check_outside,
                              copy_tokenizer_files, load_model, load_tokenizer, output_lock, read_quantization_spec,
                              resolve_config, save_model, write_json)
from llmcli.progress import SILENT, Progress
from llmcli.tokenizer import special_ids
from llmcli.training import distributed
from llmcli.training.loop import Trainer
from llmcli.training.run import (TRAINING_FILE, TrainFlags, check_run_dir, final_validation, in_processes,
                                 rank_log, read_run, resolve_data, start_run_dir)


DATA_HINTS = {"lm": "a .txt file, a folder of .txt files, or JSONL with a 'text' field",
              "instruct": "JSONL with 'instruction', 'output' and optionally 'input' fields",
              "classify": "JSONL with 'text' and 'label' fields"}


def _check_base(base: Path, method: str) -> None:
    _, directory = resolve_config(base)
    if directory is None:
        raise UserError(f"{base}: fine-tuning starts from a trained model directory (config.json, model.safetensors, "
                        f"tokenizer.json); build and train one with `llmcli train`, or convert one with "
                        f"`llmcli convert from-hf`")
    if not (base / TOKENIZER_FILE).is_file():
        raise UserError(f"{base}: no {TOKENIZER_FILE}; fine-tuning needs the tokenizer the model was trained with")
    quantized = read_quantization_spec(base)
    if quantized is not None and method == "full":
        raise UserError(f"{base}: is quantized ({quantized.get('scheme')}), and --method full would train its integer "
                        f"weights; fine-tune the full-precision model and quantize after, or train lora, adapter or "
                        f"prompt on this one (its integers stay frozen)")
    adapter = read_adapter_config(base)
    if adapter is not None and adapter["method"] != "full":  # after full fine-tuning, adapter/ holds only a head
        raise UserError(f"{base}: holds a {adapter['method']} adapter, which fine-tuning would ignore; fine-tune "
                        f"its base instead, or fold a LoRA in first with `llmcli merge {base} --out DIR`")


def _link_or_copy(source: Path, target: Path) -> None:
    """The base weights, without a second copy on disk where a hard link is possible (files are never
    written in place, so the link cannot change the original)."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    tmp.replace(target)


def _resolve_spec(saved: dict | None, given: FinetuneSpec | dict) -> FinetuneSpec:
    """A new run's settings, or a resumed run's (flags given again must agree with them)."""
    if isinstance(given, FinetuneSpec):
        given = given.to_dict()
    given = {k: (parse_targets(v) if k == "lora_targets" else v) for k, v in given.items() if v is not None}
    if saved is None:
        for name in ("method", "task"):
            if name not in given:
                raise UserError(f"--{name} is required (one of {', '.join(METHODS if name == 'method' else TASKS)})")
        return FinetuneSpec(**given)
    spec = FinetuneSpec.from_dict(saved["finetune"])
    stored = spec.to_dict()
    for key, value in given.items():
        if key in stored and stored[key] != value:
            raise UserError(f"--{key.replace('_', '-')} {value} differs from the resumed run's ({stored[key]}); "
                            f"resume with the same settings, or start a new run")
    return spec


def finetune(base: str | Path | None, data: str | None, out: str, flags: TrainFlags, settings: FinetuneSpec | dict,
             *, log: Callable = print, progress: Progress = SILENT, on_step: Callable | None = None) -> dict:
    """Fine-tune `base` into `out`; returns a summary with the final validation metrics.

    settings: a FinetuneSpec, or its fields (None = default; on resume only the ones given, which must match
    the run's).
    """
    return in_processes(flags, lambda parallel: _finetune(base, data, out, flags, settings, log, progress, on_step,
                                                           parallel))


def _finetune(base, data, out, flags: TrainFlags, settings, log, progress, on_step, parallel) -> dict:
    main = parallel is None or parallel.is_main
    log = rank_log(parallel, log)
    run_dir = Path(out)
    with output_lock(run_dir) if main else contextlib.nullcontext():  # one writer per run directory
        if flags.resume:
            saved = read_run(run_dir)
            spec = _resolve_spec(saved, settings)
            data, base, source = resolve_data(data, saved), Path(saved["base"]), run_dir
        else:
            if base is None:
                raise UserError("finetune needs the model directory to start from")
            check_run_dir(run_dir, resume=False, force=flags.force)
            saved, base = None, Path(base)
            spec = _resolve_spec(None, settings)
            _check_base(base, spec.method)
            check_outside(base, run_dir)
            if data is None:
                raise UserError(f"--data is required: {DATA_HINTS[spec.task]}")
            data, source = resolve_data(data, None), base
        config, _ = resolve_config(source)
        spec.check_family(config.family)
        args = flags.train_args(saved and saved.get("args"), config)
        if parallel:
            distributed.check_model(config, parallel.tp)
            if parallel.tp > 1 and spec.method != "full":
                raise UserError(f"--tp splits the model's own projections; --method {spec.method} wraps them: "
                                f"use --tp with --method full, or data parallelism alone")
        if spec.method == "prompt" and args.seq_len + spec.prompt_tokens > config.max_seq_len:
            raise UserError(f"--seq-len {args.seq_len} plus --prompt-tokens {spec.prompt_tokens} exceeds "
                            f"{config.name}'s max_seq_len ({config.max_seq_len}); lower one of them")
        tokenizer = load_tokenizer(source)
        # Bad data or settings fail here, before anything is written.
        global_batch = args.batch_size * (parallel.dp if parallel else 1)  # each rank takes its rows
        template = model_chat_template(source, config, tokenizer) if spec.task == "instruct" else None
        task = build_task(spec.task, config.family, tokenizer, special_ids(tokenizer, config), data, args.seq_len,
                          global_batch, args.seed, args.eval_batches, template)
        num_labels = len(task.labels) if task.labels else None
        torch.manual_seed(args.seed)  # the new modules' init
        loaded = load_model(source)
        # A checkpoint base is stored in the run directory under llmcli's names: its tensors, before attach wraps them
        base_state = dict(loaded.state_dict()) if not flags.resume and is_hf_checkpoint(base) else None
        model = attach(loaded, spec, num_labels)

        def start() -> None:
            if not flags.resume:
                start_run_dir(run_dir)
                if base_state is not None:
                    save_model(loaded, run_dir, state=base_state)
                else:
                    _link_or_copy(base / WEIGHTS_FILE, run_dir / WEIGHTS_FILE)
                    if (base / QUANTIZATION_FILE).is_file():  # a quantized base: its layout goes with its weights
                        shutil.copyfile(base / QUANTIZATION_FILE, run_dir / QUANTIZATION_FILE)
                    write_json(run_dir / CONFIG_FILE, config.to_dict())
                copy_tokenizer_files(base, run_dir)
            write_json(run_dir / TRAINING_FILE, {"model": str(base), "base": str(Path(base).resolve()), "data": data,
                                                 "args": args.to_dict(), "finetune": spec.to_dict()})
            flags.write_run_config(run_dir, args, data)

        distributed.on_main(parallel, start)
        trainable, total = parameter_counts(model)
        trainer = Trainer(model, task.train, task.val_batches, args, run_dir, loss_fn=task.loss_fn,
                          eval_fn=task.eval_fn, on_step=on_step, progress=progress, log=log, parallel=parallel)
        if flags.resume:
            log(f"resuming {run_dir} from step {trainer.resume()}")
        counts = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in task.counts.items())
        log(f"fine-tuning {config.name} ({spec.method}, {spec.task}): {trainable:,} of {total:,} parameters trainable "
            f"({trainable / total:.2%}); {counts}; {trainer.device}, {trainer.precision}")
        result = trainer.fit()
        final = final_validation(trainer.history)
        result["checkpoint"] = result["checkpoint"] and str(result["checkpoint"])
        summary = {"run_dir": str(run_dir), **result, "method": spec.method, "task": spec.task, "family": config.family,
                   "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
                   **{k: v for k, v in final.items() if k.startswith("val_")}, "labels": task.labels, **task.counts,
                   "peft": None, "peft_skipped": None, "device": str(trainer.device), "precision": trainer.precision}
        if parallel:  # the exports below read whole modules: gather the full weights into a plain copy on rank 0
            model = parallel.gather_model(trainer.model, lambda: attach(load_model(source), spec, num_labels))
            if not main:
                return summary

        if spec.method == "full":
            save_model(language_model(model), run_dir)
        if spec.method != "full" or spec.task == "classify":
            save_adapter(model, spec, task.labels, config, base, run_dir, extra={"template": task.prompt_format})
        peft_note = None
        if spec.method == "lora":
            peft_note = peft_blocker(model, spec.task)
            if peft_note is None:
                export_peft(model, base, run_dir / PEFT_DIR)
        summary.update(peft=None if peft_note else (str(run_dir / PEFT_DIR) if spec.method == "lora" else None),
                       peft_skipped=peft_note)
        return summary
