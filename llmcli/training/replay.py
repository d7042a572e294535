"""run.toml: a run's command and its fully resolved flags, written when the run starts, so that
`llmcli train --config run.toml [--flag value ...]` replays it (flags given on the command line win).

Flags that describe one launch (where to write, resume, force, the processes) are not in it.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Mapping

from llmcli.errors import UserError

RUN_CONFIG = "run.toml"
PER_LAUNCH = frozenset({"out", "resume", "force", "nproc", "strategy", "tp", "cpu_offload", "config", "json_out"})


def resolved_flags(params: Mapping, args: Mapping, data: str | None) -> dict:
    """The command's parameters with the training arguments as resolved (defaults filled in) and the data and
    model as absolute paths where they are paths; None (not given, nothing to say) is left out."""
    flags = {k: v for k, v in params.items() if k not in PER_LAUNCH}
    flags.update({k: v for k, v in args.items() if k in flags})
    if "data" in flags:
        flags["data"] = data
    for key in ("model", "base", "teacher"):
        if isinstance(flags.get(key), str) and Path(flags[key]).exists():
            flags[key] = str(Path(flags[key]).resolve())
    return {k: v for k, v in flags.items() if v is not None}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def write_run_config(run_dir: Path, command: str, flags: Mapping) -> Path:
    """run.toml in run_dir, through a temporary file."""
    lines = [f"# replay: llmcli {command} --config {RUN_CONFIG} --out NEW_DIR [--flag value ...]",
             f"command = {toml_value(command)}", "", "[flags]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in flags.items()]
    path = run_dir / RUN_CONFIG
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def read_run_config(path: str | Path, command: str | None = None, allowed: set[str] | None = None) -> dict:
    """The [flags] of a run.toml (or of the run.toml in a run directory), checked against the command
    that replays it and the names of its parameters."""
    path = Path(path)
    if path.is_dir():
        path = path / RUN_CONFIG
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the run.toml a run wrote (or its run directory)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{path}: not a readable TOML file ({e})") from None
    flags = data.get("flags")
    if not isinstance(flags, dict):
        raise UserError(f"{path}: no [flags] table; a run.toml holds `command = ...` and a [flags] table")
    if command is not None and data.get("command") not in (None, command):
        raise UserError(f"{path} is a `llmcli {data.get('command')}` run; replay it with "
                        f"`llmcli {data.get('command')} --config {path}`")
    if allowed is not None:
        unknown = sorted(set(flags) - (allowed - PER_LAUNCH))
        if unknown:
            known = ", ".join(sorted(allowed - PER_LAUNCH))
            raise UserError(f"{path}: unknown key {unknown[0]!r} in [flags] for `llmcli {command}`; "
                            f"the keys are: {known}")
    return flags
