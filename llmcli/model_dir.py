"""The model directory: config.json + model.safetensors (+ tokenizer.json). Written atomically.

Weights are only ever read from safetensors; pickle files are refused, never opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from llmcli.chat_template import SPECIAL_TOKENS_FILE, TEMPLATE_FILE, TOKENIZER_CONFIG_FILE
from llmcli.config import (CONFIG_FILE, PICKLE_SUFFIXES, QUANTIZATION_FILE, TOKENIZER_FILE, WEIGHTS_FILE, ModelConfig,
                           load_config_json, load_toml, zoo_entries)
from llmcli.data import read_corpus
from llmcli.errors import UserError
from llmcli.interop.reading import hf_checkpoint_config, is_hf_checkpoint, load_hf_model
from llmcli.models import build_model, build_on_meta
from llmcli.models.quantized import apply_quantized_layout
from llmcli.profiling.counts import count
from llmcli.runtime import machine_memory
from llmcli.tokenizer import KINDS, encode_plain, save_tokenizer, train_tokenizer


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it is renamed to `out`.

    An existing non-empty `out` is refused unless `force`; with `force` it is replaced only
    after the new directory is complete, in one atomic exchange where the OS has it, so a failure
    or a kill at any point leaves the user the old `out` or the new one. A full disk says so.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"{out}: already exists and is not empty; choose another --out or pass --force to "
                            f"replace it")
        with _written_atomically(out) as tmp:
            yield tmp


@contextlib.contextmanager
def _written_atomically(out: Path) -> Iterator[Path]:
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run (the lock is ours now)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    with reporting_disk_full(out, f"the previous {out} is unchanged" if out.exists() else "nothing was written"):
        try:
            tmp.mkdir()
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if out.exists() and _exchange(tmp, out):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()  # tmp now holds the old output
    elif out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` while this process writes it: a second llmcli process writing the same
    output is refused, never interleaved. The lock files live in the temporary directory (one per output
    path), not beside the user's files; the OS drops a lock when its process ends, however it ends."""
    out = Path(out)
    folder = Path(tempfile.gettempdir()) / f"llmcli-locks-{os.getuid()}"  # per user: /tmp is shared
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.is_symlink() or folder.stat().st_uid != os.getuid():
        raise UserError(f"{folder}: belongs to another user; remove it, or set TMPDIR to a directory of yours")
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:24]
    descriptor = os.open(folder / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "r+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise UserError(f"{out}: another llmcli process (pid {holder}) is writing it; wait for it to finish or "
                            f"choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def reporting_disk_full(target: Path, kept: str) -> Iterator[None]:
    """A full disk (ENOSPC, EDQUOT) while writing `target` becomes a UserError that says what was kept."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"{target}: no space left on the device while writing it ({e.strerror}); {kept}; "
                        f"free some space and run again") from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def check_outside(source: str | os.PathLike, out: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse an output that is the input directory, inside it, or around it: writing (or replacing) it would
    change or delete the input."""
    source, out = Path(source).resolve(), Path(out).resolve()
    if out == source or source in out.parents or out in source.parents:
        where = ("the input directory itself" if out == source else f"inside the input directory {source}"
                 if source in out.parents else f"a directory that holds the input {source}")
        raise UserError(f"{flag} {out} is {where}; choose an output apart from it")


def write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def save_model(model, directory: Path, state: dict | None = None) -> None:
    """Write config.json and model.safetensors into an (already prepared) directory. state: the tensors to write
    instead of the model's own state_dict (one taken before fine-tuning modules were attached to it)."""
    write_json(directory / CONFIG_FILE, model.config.to_dict())
    state = {k: v.detach().contiguous().cpu() for k, v in (state or model.state_dict()).items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})  # one key: safetensors orders metadata at random
    tmp.replace(directory / WEIGHTS_FILE)


def read_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e}); rebuild or re-convert the model") from None


def resolve_config(ref: str | os.PathLike) -> tuple[ModelConfig, Path | None]:
    """Resolve NAME, a TOML path, a model directory or a Hugging Face checkpoint directory.

    Returns the config and, for a directory, its path (else None).
    """
    path = Path(ref)
    if path.is_dir():
        return (hf_checkpoint_config(path) if is_hf_checkpoint(path) else load_config_json(path)), path
    if path.suffix == ".toml":
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        return load_toml(path), None
    entries = zoo_entries()
    if str(ref) in entries:
        return load_toml(entries[str(ref)]), None
    close = difflib.get_close_matches(str(ref), list(entries), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see `llmcli zoo list`"
    raise UserError(f"unknown model '{ref}': not a zoo name, TOML file or model directory; {hint}")


def load_model(ref: str | os.PathLike, device: str | None = None, dtype=None, seed: int | None = None):
    """Load a model directory or a Hugging Face checkpoint directory (converted in memory), or build a fresh model
    from a zoo name or TOML path. Returned in eval mode."""
    if Path(ref).is_dir() and is_hf_checkpoint(Path(ref)):  # its config comes with the conversion: read it once
        return load_hf_model(Path(ref)).eval().to(device=device or "cpu", dtype=dtype)
    config, directory = resolve_config(ref)
    if directory is None:
        model = build_model(config, seed=seed)
    else:
        model = build_on_meta(config)
        spec = read_quantization_spec(directory)
        if spec is not None:  # integer weights are assigned into a quantized layout, never expanded to fp32
            apply_quantized_layout(model, spec, str(directory / QUANTIZATION_FILE))
        state = read_safetensors(_weights_path(directory))
        _load_state(model, state, directory / WEIGHTS_FILE)
    model.eval()
    return model.to(device=device or "cpu", dtype=dtype)  # casts floating tensors only: integer weights stay


def read_quantization_spec(directory: Path) -> dict | None:
    """quantization.json of a quantized model directory, or None."""
    path = directory / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); re-run `llmcli quantize`") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a JSON object; re-run `llmcli quantize`")
    return spec


def _weights_path(directory: Path) -> Path:
    path = directory / WEIGHTS_FILE
    if path.is_file():
        return path
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{directory}: weights are only read from safetensors, and {pickles[0]} is a pickle file "
                        f"(loading it could run arbitrary code); convert it to model.safetensors first")
    raise UserError(f"{directory}: no {WEIGHTS_FILE}; create the model with `llmcli build` or `llmcli convert`")


def _load_state(model, state: dict, where: Path) -> None:
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{where}: weights do not match config.json ({detail}); "
                        f"the directory mixes files from different models")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"{where}: tensor '{name}' has shape {tuple(tensor.shape)}, config.json implies "
                            f"{tuple(expected[name].shape)}; the directory mixes files from different models")
        both_float = tensor.is_floating_point() and expected[name].is_floating_point()
        if tensor.dtype != expected[name].dtype and not both_float:  # quantized weights are integers
            raise UserError(f"{where}: tensor '{name}' is {tensor.dtype}, expected {expected[name].dtype}; "
                            f"the directory mixes files from different models")
    model.load_state_dict(state, strict=True, assign=True)


def copy_tokenizer_files(source: Path, out: Path) -> bool:
    """tokenizer.json and, where the source has them, the chat template and the special tokens' names; returns
    whether there was a tokenizer.json to copy."""
    for name in (TOKENIZER_CONFIG_FILE, TEMPLATE_FILE, SPECIAL_TOKENS_FILE):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if not (source / TOKENIZER_FILE).is_file():
        return False
    shutil.copyfile(source / TOKENIZER_FILE, out / TOKENIZER_FILE)
    return True


def load_tokenizer(ref: str | os.PathLike):
    """The `tokenizers.Tokenizer` of a model directory."""
    path = Path(ref) / TOKENIZER_FILE
    if not path.is_file() and is_hf_checkpoint(Path(ref)):
        raise UserError(f"{ref}: a Hugging Face checkpoint without {TOKENIZER_FILE} (llmcli reads the fast-tokenizer "
                        f"file, not tokenizer.model or vocab files); download {TOKENIZER_FILE} from the model's page")
    if not path.is_file():
        raise UserError(f"{ref}: no {TOKENIZER_FILE}; train one with `llmcli tokenizer train` or `llmcli train`")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"{path}: not a valid tokenizer ({e})") from None


def stored_tensor_bytes(directory: Path) -> int:
    """Bytes of the tensors in model.safetensors, from its header alone (file size minus header)."""
    path = _weights_path(directory)
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def build_model_dir(config: ModelConfig, out: Path, seed: int, force: bool = False) -> int:
    """Write a freshly initialised model directory; returns its parameter count. Refuses a model whose fp32
    weights (and the copy safetensors writes) would not fit in this machine's memory."""
    params = count(config).params_with_heads
    need, have = 2 * 4 * params, machine_memory("cpu")
    if need > have:
        raise UserError(f"{config.name}: building needs about {need / 1e9:,.1f} GB of memory, this machine has "
                        f"{have / 1e9:,.1f} GB; try `llmcli memory-estimate {config.name}` or a smaller model")
    with atomic_output_dir(out, force) as tmp:
        save_model(build_model(config, seed=seed), tmp)
    return params


def train_tokenizer_dir(data: str | os.PathLike | None, vocab_size: int, kind: str, out: Path,
                        force: bool = False) -> dict:
    """`llmcli tokenizer train`: a tokenizer trained on a corpus, written as OUT/tokenizer.json beside the model
    files of a model directory (which stay untouched) or into a new directory; returns its figures."""
    out = Path(out)
    if kind not in KINDS:
        raise UserError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    if (out / TOKENIZER_FILE).exists() and not force:
        raise UserError(f"{out / TOKENIZER_FILE}: already exists; pass --force to replace it")
    if (out / CONFIG_FILE).is_file():
        model_vocab = load_config_json(out).vocab_size
        if vocab_size > model_vocab:
            raise UserError(f"{out}: the model's vocab_size is {model_vocab}, smaller than --vocab-size {vocab_size}; "
                            f"use --vocab-size {model_vocab} or less")
    docs = read_corpus(data)
    tokenizer = train_tokenizer(docs, kind, vocab_size)
    tokens = sum(map(len, encode_plain(tokenizer, docs)))
    if out.is_dir():
        save_tokenizer(tokenizer, out)
    else:
        with atomic_output_dir(out) as tmp:
            save_tokenizer(tokenizer, tmp)
    return {"path": str(out / TOKENIZER_FILE), "kind": kind, "vocab_size": tokenizer.get_vocab_size(),
            "documents": len(docs), "tokens": tokens, "chars": sum(map(len, docs))}
