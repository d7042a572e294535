"""`llmcli train`: resolve the model, tokenizer and corpus, then run the loop and export the model.

The run directory is a model directory (config.json, model.safetensors, tokenizer.json) plus
training.json, metrics.jsonl and checkpoints/. Under torchrun every rank runs this function; rank 0
alone writes the run directory and trains the tokenizer (see distributed.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer

from llmcli.config import ModelConfig
from llmcli.data import PretrainingData, document_stream, read_corpus, split_documents, text_bytes_per_token
from llmcli.errors import UserError
from llmcli.model_dir import (TOKENIZER_FILE, check_outside, load_model, load_tokenizer, output_lock,
                              reporting_disk_full, resolve_config, save_model, write_json)
from llmcli.models import build_model, build_on_meta
from llmcli.progress import SILENT, Progress
from llmcli.tokenizer import save_tokenizer, special_ids, train_tokenizer
from llmcli.training import distributed
from llmcli.training.distillation import Distillation, copy_from_teacher
from llmcli.training.loop import Trainer
from llmcli.training.run import (TRAINING_FILE, TrainFlags, check_run_dir, final_validation, in_processes,
                                 rank_log, resolve_data, start_run_dir)


def load_or_train_tokenizer(config: ModelConfig, directories: list[Path], train_docs: list[str]):
    """The first tokenizer.json found in `directories`, else a new one trained on the training split."""
    for directory in directories:
        if (directory / TOKENIZER_FILE).is_file():
            tokenizer = load_tokenizer(directory)
            break
    else:
        tokenizer = train_tokenizer(train_docs, config.tokenizer, config.vocab_size)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but {config.name} has vocab_size "
                        f"{config.vocab_size}; use a tokenizer of at most that size or a model with a larger vocab")
    return tokenizer


def pretrain(model_ref: str | ModelConfig, data: str | None, out: str | None, flags: TrainFlags = TrainFlags(), *,
             log: Callable = print, progress: Progress = SILENT, on_step: Callable | None = None,
             tokenizer_dir: Path | None = None, distillation: Distillation | None = None) -> dict:
    """Pre-train (or continue pre-training) a model; returns a summary with the final validation metrics.

    model_ref: a zoo name, TOML file or model directory (whose weights are the start), or a config.
    tokenizer_dir: where the tokenizer comes from (default: the run or model directory, else trained).
    distillation: train against a teacher's soft targets (llmcli distill). Under torchrun, batch_size is
    per rank.
    """
    return in_processes(flags, lambda parallel: _pretrain(model_ref, data, out, flags, log, progress, on_step,
                                                           tokenizer_dir, distillation, parallel))


def _pretrain(model_ref, data, out, flags: TrainFlags, log, progress, on_step, tokenizer_dir, distillation,
              parallel) -> dict:
    main = parallel is None or parallel.is_main
    log = rank_log(parallel, log)
    if isinstance(model_ref, ModelConfig):
        config, source_dir, model_name = model_ref, None, model_ref.name
    else:
        (config, source_dir), model_name = resolve_config(model_ref), str(model_ref)
    run_dir = Path(out) if out else Path("runs") / config.name
    with output_lock(run_dir) if main else contextlib.nullcontext():  # one writer per run directory
        if source_dir is not None and not flags.resume:
            check_outside(source_dir, run_dir)
        saved = distributed.on_main(parallel, lambda: check_run_dir(run_dir, flags.resume, flags.force))
        if flags.resume:
            config, _ = resolve_config(run_dir)  # config.json is written when a run starts
        args = flags.train_args(saved and saved.get("args"), config)
        if parallel:
            distributed.check_model(config, parallel.tp)
        data = resolve_data(data, saved)

        train_docs, val_docs = split_documents(read_corpus(data))
        directories = [d for d in (tokenizer_dir, run_dir if flags.resume else None, source_dir) if d is not None]
        if parallel:  # one tokenizer, trained once, for every rank
            tokenizer = Tokenizer.from_str(distributed.on_main(
                parallel, lambda: load_or_train_tokenizer(config, directories, train_docs).to_str()))
        else:
            tokenizer = load_or_train_tokenizer(config, directories, train_docs)
        special = special_ids(tokenizer, config)
        train_tokens, val_tokens = (document_stream(tokenizer, docs, special) for docs in (train_docs, val_docs))
        global_batch = args.batch_size * (parallel.dp if parallel else 1)  # each rank takes its rows
        dataset = PretrainingData(config.family, train_tokens, special, tokenizer.get_vocab_size(), args.seq_len,
                                  global_batch, args.seed)
        val_batches = dataset.eval_batches(val_tokens, args.eval_batches)

        if flags.resume:
            model = build_model(config)  # the weights come from the checkpoint
        elif source_dir is None:
            model = build_model(config, seed=args.seed)
        else:
            model = load_model(source_dir, seed=args.seed)
        if distillation is not None and distillation.init_from_teacher and not flags.resume:
            copied = copy_from_teacher(model, distillation.teacher)
            log(f"initialised {copied} student tensors from the teacher")

        def start() -> None:  # every check has passed: the run directory starts here
            if not flags.resume:
                start_run_dir(run_dir)
            write_json(run_dir / "config.json", config.to_dict())
            save_tokenizer(tokenizer, run_dir)
            record = distillation.record() if distillation is not None else {}
            write_json(run_dir / TRAINING_FILE, {"model": model_name, "data": data, "args": args.to_dict(), **record})
            flags.write_run_config(run_dir, args, data)

        distributed.on_main(parallel, start)
        parameters = model.num_parameters()
        loss = {"loss_fn": distillation.loss} if distillation is not None else {}
        trainer = Trainer(model, dataset, val_batches, args, run_dir, on_step=on_step, progress=progress, log=log,
                          parallel=parallel, val_bytes_per_token=text_bytes_per_token(val_docs, val_tokens), **loss)
        if flags.resume:
            log(f"resuming {run_dir} from step {trainer.resume()}")
        where = f"{trainer.device}, {trainer.precision}"
        if parallel:
            where = (f"{parallel.world} processes ({parallel.strategy}, dp {parallel.dp} x tp {parallel.tp}, batch "
                     f"{args.batch_size} per rank, {global_batch} in all), {trainer.device.type}, {trainer.precision}")
        log(f"training {config.name} ({parameters:,} parameters) on {len(train_tokens):,} tokens "
            f"({len(val_tokens):,} held out), {where}")
        result = trainer.fit()
        with reporting_disk_full(run_dir / "model.safetensors", f"the checkpoint {result['checkpoint']} is kept"):
            if parallel:  # the full weights, gathered to rank 0, as a plain model directory
                plain = parallel.gather_model(trainer.model, lambda: build_on_meta(config))
                if main:
                    save_model(plain, run_dir)
            else:
                save_model(trainer.model, run_dir)
        final = final_validation(trainer.history)
        return {"run_dir": str(run_dir), **result, "val_loss": final.get("val_loss"),
                "val_perplexity": final.get("val_perplexity"),
                "val_bits_per_byte": final.get("val_bits_per_byte"), "train_tokens": len(train_tokens),
                "val_tokens": len(val_tokens), "device": str(trainer.device), "precision": trainer.precision,
                "family": config.family}
