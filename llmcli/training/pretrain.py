"""`llmcli train`: resolve the model, tokenizer and corpus, then run the loop and export the model.

The run directory is a model directory (config.json, model.safetensors, tokenizer.json) plus
training.json, metrics.jsonl and checkpoints/. Under torchrun every rank runs this function; rank 0
alone writes the run directory and trains the tokenizer (see distributed.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

from llmcli.config import ModelConfig, resolve_config
from llmcli.errors import UserError
from llmcli.model_dir import TOKENIZER_FILE, save_model, write_json
from llmcli.training import distributed
from llmcli.training.loop import Trainer, TrainArgs

TRAINING_FILE = "training.json"


def merge_args(saved: dict | None, given: dict) -> TrainArgs:
    """Defaults, overridden by a resumed run's saved flags, overridden by flags given now (not None)."""
    values = TrainArgs().to_dict()
    names = {f.name for f in fields(TrainArgs)}
    values.update({k: v for k, v in (saved or {}).items() if k in names})
    values.update({k: v for k, v in given.items() if v is not None and k in names})
    return TrainArgs(**values)


def check_args(args: TrainArgs, config: ModelConfig) -> None:
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("save_every", "eval_every", "warmup"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.seq_len > config.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} is above {config.name}'s max_seq_len ({config.max_seq_len}); "
                        f"use --seq-len {config.max_seq_len} or less")


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> dict | None:
    """Check or clear the run directory; returns the saved training.json of a run being resumed."""
    if resume:
        if not (run_dir / TRAINING_FILE).is_file():
            raise UserError(f"{run_dir}: no run to resume (no {TRAINING_FILE}); drop --resume to start one")
        return json.loads((run_dir / TRAINING_FILE).read_text())
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it, "
                            f"--force to start over, or choose another --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def load_or_train_tokenizer(config: ModelConfig, directories: list[Path], train_docs: list[str]):
    """The first tokenizer.json found in `directories`, else a new one trained on the training split."""
    from llmcli.model_dir import load_tokenizer
    from llmcli.tokenizer import train_tokenizer

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


def pretrain(model_ref: str, data: str | None, out: str | None, given: dict, resume: bool = False,
             force: bool = False, on_step=None, log=print, *, config: ModelConfig | None = None,
             tokenizer_dir: Path | None = None, loss_fn=None, prepare_model=None, record: dict | None = None) -> dict:
    """Pre-train (or continue pre-training) a model; returns a summary with the final validation metrics.

    Distillation reuses this loop: `config` replaces resolving model_ref, `tokenizer_dir` supplies the
    tokenizer, `loss_fn` replaces the family loss, `prepare_model` edits a fresh model (e.g. copies
    teacher layers), and `record` is saved in training.json.

    Under torchrun, `given` may carry strategy (ddp|fsdp), tp and cpu_offload; batch_size is per rank.
    """
    parallel = distributed.start(given)
    summary = _pretrain(model_ref, data, out, given, resume, force, on_step, log, parallel, config, tokenizer_dir,
                        loss_fn, prepare_model, record)
    distributed.stop(parallel)
    return summary


def _pretrain(model_ref, data, out, given, resume, force, on_step, log, parallel, config, tokenizer_dir, loss_fn,
              prepare_model, record) -> dict:
    from llmcli.data import PretrainingData, document_stream, read_corpus, split_documents
    from llmcli.model_dir import load_model
    from llmcli.models import build_model
    from llmcli.tokenizer import save_tokenizer, special_ids

    main = parallel is None or parallel.is_main
    log = log if main else _quiet
    config, source_dir = (config, None) if config is not None else resolve_config(model_ref)
    run_dir = Path(out) if out else Path("runs") / config.name
    if source_dir is not None and source_dir.resolve() == run_dir.resolve() and not resume:
        raise UserError(f"{run_dir}: --out is the model directory itself; choose a new --out, or --resume")
    saved = distributed.on_main(parallel, lambda: prepare_run_dir(run_dir, resume, force))
    if resume:
        config, _ = resolve_config(run_dir)  # config.json is written when a run starts
    args = merge_args(saved and saved.get("args"), given)
    args.seq_len = args.seq_len or min(128, config.max_seq_len)
    check_args(args, config)
    if parallel:
        distributed.check_model(config, parallel.tp)
    data = str(Path(data).resolve()) if data is not None else None  # a resume may start from elsewhere
    if resume and saved.get("data") != data and data is not None:
        raise UserError(f"--data {data} differs from the resumed run's ({saved.get('data')}); resume with the same data")
    data = data if data is not None else (saved or {}).get("data")

    train_docs, val_docs = split_documents(read_corpus(data))
    directories = [d for d in (tokenizer_dir, run_dir, source_dir) if d is not None]
    if parallel:  # one tokenizer, trained once, for every rank
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(distributed.on_main(
            parallel, lambda: load_or_train_tokenizer(config, directories, train_docs).to_str()))
    else:
        tokenizer = load_or_train_tokenizer(config, directories, train_docs)
    special = special_ids(tokenizer)
    train_tokens, val_tokens = (document_stream(tokenizer, docs) for docs in (train_docs, val_docs))
    global_batch = args.batch_size * (parallel.dp if parallel else 1)  # each rank takes its rows
    dataset = PretrainingData(config.family, train_tokens, special, tokenizer.get_vocab_size(), args.seq_len,
                              global_batch, args.seed)
    val_batches = dataset.eval_batches(val_tokens, args.eval_batches)

    if resume:
        model = build_model(config)  # the weights come from the checkpoint
    elif source_dir is None:
        model = build_model(config, seed=args.seed)
    else:
        model = load_model(source_dir, seed=args.seed)
    if prepare_model is not None and not resume:
        prepare_model(model)
    if main:
        write_json(run_dir / "config.json", config.to_dict())
        save_tokenizer(tokenizer, run_dir)
        write_json(run_dir / TRAINING_FILE, {"model": str(model_ref), "data": data, "args": args.to_dict(),
                                             **(record or {})})
    parameters = model.num_parameters()
    trainer = Trainer(model, dataset, val_batches, args, run_dir, on_step=on_step, parallel=parallel,
                      **({"loss_fn": loss_fn} if loss_fn is not None else {}))
    if resume:
        log(f"resuming {run_dir} from step {trainer.resume()}")
    where = f"{trainer.device}, {trainer.precision}"
    if parallel:
        where = (f"{parallel.world} processes ({parallel.strategy}, dp {parallel.dp} x tp {parallel.tp}, batch "
                 f"{args.batch_size} per rank, {global_batch} in all), {trainer.device.type}, {trainer.precision}")
    log(f"training {config.name} ({parameters:,} parameters) on {len(train_tokens):,} tokens "
        f"({len(val_tokens):,} held out), {where}")
    result = trainer.fit()
    if parallel:  # the full weights, gathered to rank 0, as a plain model directory
        from llmcli.models import build_on_meta

        plain = parallel.gather_model(trainer.model, lambda: build_on_meta(config))
        if main:
            save_model(plain, run_dir)
    else:
        save_model(trainer.model, run_dir)
    final = next((r for r in reversed(trainer.history) if "val_loss" in r), {})
    return {"run_dir": str(run_dir), **result, "val_loss": final.get("val_loss"),
            "val_perplexity": final.get("val_perplexity"), "train_tokens": len(train_tokens),
            "val_tokens": len(val_tokens), "device": str(trainer.device), "precision": trainer.precision,
            "family": config.family}


def _quiet(*args, **kwargs) -> None:
    pass
