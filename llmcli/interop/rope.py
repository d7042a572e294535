"""Rotary settings in a Hugging Face config.json, both ways: transformers 5 keeps them in `rope_parameters`
(with `rope_theta` inside), older configs in a top-level `rope_theta` and `rope_scaling`; `partial_rotary_factor`
and Phi-3's `original_max_position_embeddings` may stand at the top level too."""

from __future__ import annotations

from llmcli.config import ROPE_SCALINGS, ModelConfig
from llmcli.errors import UserError

RENAMED = {"original_max_position_embeddings": "original_max_seq_len"}  # HF key -> ours; the rest are alike
HF_NAMES = {"type": "rope_type", **{ours: hf for hf, ours in RENAMED.items()}}  # ours -> HF
BESIDE = ("rope_type", "type", "rope_theta", "partial_rotary_factor")  # keys that are not the scaling's own


def hf_rope(hf: dict) -> dict:
    """Every rotary key of the config, merged as transformers 5 merges them: a non-empty rope_scaling replaces
    rope_parameters, and the top-level rope_theta and partial_rotary_factor fill what the dict leaves out."""
    merged = {key: hf[key] for key in ("rope_theta", "partial_rotary_factor") if hf.get(key) is not None}
    chosen = hf.get("rope_scaling") or hf.get("rope_parameters")
    return {**merged, **chosen} if isinstance(chosen, dict) else merged


def rope_from_hf(hf: dict, where: str) -> dict:
    """rope_base, rope_scaling and rotary_fraction for an llmcli config; an unknown scaling or key is refused
    by name."""
    rope = hf_rope(hf)
    kind = rope.get("rope_type", rope.get("type")) or "default"
    fields = {"rope_base": rope.get("rope_theta", 10000.0), "rotary_fraction": rope.get("partial_rotary_factor", 1.0)}
    if kind == "default":
        return fields
    if kind not in ROPE_SCALINGS:
        raise UserError(f"{where}: not supported: rope_type {kind!r} (llmcli computes "
                        f"{', '.join(ROPE_SCALINGS)})")
    scaling = {"type": kind}
    if kind in ("llama3", "yarn", "longrope"):  # Phi-3's top-level value first, as transformers takes it
        rope["original_max_position_embeddings"] = hf.get("original_max_position_embeddings") or rope.get(
            "original_max_position_embeddings") or hf.get("max_position_embeddings")
    required, optional = ROPE_SCALINGS[kind]
    for key, value in rope.items():
        ours = RENAMED.get(key, key)
        if key in BESIDE or value is None:
            continue
        if ours not in (*required, *optional):
            raise UserError(f"{where}: not supported: {key} in the {kind!r} rotary scaling")
        scaling[ours] = value
    return {**fields, "rope_scaling": scaling}


def rope_to_hf(cfg: ModelConfig) -> dict:
    """The rotary keys of config.json, in both spellings so that transformers 4 and 5 read them."""
    scaling = {HF_NAMES.get(key, key): value for key, value in (cfg.rope_scaling or {"type": "default"}).items()}
    partial = {"partial_rotary_factor": cfg.rotary_fraction} if cfg.rotary_fraction != 1.0 else {}
    return {"rope_theta": cfg.rope_base, "rope_scaling": scaling if cfg.rope_scaling else None,
            "rope_parameters": {**scaling, "rope_theta": cfg.rope_base, **partial}, **partial}
