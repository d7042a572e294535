"""GPTQ: calibrated post-training quantization, written from Frantar, Ashkboos, Hoefler & Alistarh 2022
("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", arXiv:2210.17323).

For one linear layer with calibration inputs X, GPTQ minimises ||W X - Q X||² by quantizing one input column
at a time and moving that column's error onto the columns not yet quantized, weighted by the inverse of the
Hessian H = 2 X Xᵀ (the optimal brain surgeon update). The paper's three steps, all here: a fixed column order
(left to right, or by decreasing H_jj with act-order), lazy batch updates over blocks of 128 columns, and the
rows of H⁻¹ taken from its upper Cholesky factor, with 1% of the mean diagonal added to H as dampening.

Layers are calibrated block by block, in order: a block sees the outputs of the blocks already quantized.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from llmcli.compression.calibration import run_calibration
from llmcli.models.layout import block_of
from llmcli.models.quantized import qrange, symmetric_scales

DAMP = 0.01  # λ = 1% of the mean diagonal of H (paper, sec. 4 "Step 3")
BLOCK_SIZE = 128  # columns per lazy batch update (paper, sec. 4 "Step 2": B = 128)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  act_order: bool = False, damp: float = DAMP,
                  block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight and (K, K) Hessian -> (q int8 (N, K), scales (N, K / group_size)), as quantize_rtn returns.

    Group scales come from the weights as updated when the group's first column is reached (the paper's
    grouping). With act_order the columns are visited out of order, so each group's scale is fixed up front from
    the original weights ("static groups") and the stored layout stays contiguous groups.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    group_size = group_size or cols
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0  # inputs never seen in calibration: no error to spread from or onto them
    H[dead, dead] = 1.0
    lo, hi = qrange(bits)
    perm = None
    if act_order:
        scales = symmetric_scales(W, group_size, bits)
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        scales = torch.empty(rows, cols // group_size, device=W.device)
    Hinv = _inverse_cholesky(H, damp)

    Q = torch.empty(rows, cols, dtype=torch.int8, device=W.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, block_inv = W[:, start:end].clone(), Hinv[start:end, start:end]
        errors = torch.empty_like(block)
        for i in range(end - start):
            col = start + i
            if perm is None and col % group_size == 0:
                # the group lies inside this block (block_size is a multiple of 32/64/128) or is the whole row
                source = block[:, i:i + group_size] if i + group_size <= end - start else W[:, col:col + group_size]
                scales[:, col // group_size] = symmetric_scales(source, group_size, bits)[:, 0]
            scale = scales[:, (perm[col] if perm is not None else col) // group_size]
            w = block[:, i]
            q = (w / scale).round().clamp(lo, hi)
            Q[:, col] = q.to(torch.int8)
            err = (w - q * scale) / block_inv[i, i]
            block[:, i:] -= err[:, None] * block_inv[i, i:][None, :]
            errors[:, i] = err
        W[:, end:] -= errors @ Hinv[start:end, end:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, scales


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹; λ grows tenfold while H + λI is not positive definite."""
    mean_diag = H.diagonal().mean()
    eye = torch.eye(H.shape[0], device=H.device)
    for attempt in range(5):
        L, info = torch.linalg.cholesky_ex(H + damp * 10 ** attempt * mean_diag * eye)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even with 1000% dampening")


# ---------------------------------------------------------------- the model, block by block


def collect_hessians(model: nn.Module, names: list[str], batches: list[dict],
                     stop_after: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """H = 2 XᵀX / n per linear layer, X its inputs (n rows) over the calibration batches, from forward hooks."""
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def record(name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, module.in_features).float()
            sums[name] = sums[name] + x.t() @ x if name in sums else x.t() @ x
            counts[name] += x.shape[0]
        return hook

    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in names]
    run_calibration(model, batches, device, handles, stop_after)
    missing = [name for name in names if counts[name] == 0]
    if missing:
        raise RuntimeError(f"GPTQ: layer {missing[0]} saw no calibration input")
    return {name: 2 * sums[name] / counts[name] for name in names}


def gptq_model(model: nn.Module, names: list[str], batches: list[dict], bits: int, group_size: int | None,
               act_order: bool, replace: Callable, advance: Callable[[], None]) -> None:
    """Quantize `names` block by block: collect the block's Hessians with the earlier blocks already quantized,
    quantize its layers, then `replace(name, q, scales, hessian)` swaps each in. Heads come last.

    Each block re-runs the blocks before it (stopping right after itself): quadratic in depth, but it needs no
    knowledge of what each family passes between blocks (masks, positions, encoder memory).
    """
    stages: dict[str | None, list[str]] = {}
    for name in names:
        stages.setdefault(block_of(name), []).append(name)
    order = [key for key in stages if key is not None] + ([None] if None in stages else [])
    for key in order:
        stop_after = model.get_submodule(key) if key is not None else None
        hessians = collect_hessians(model, stages[key], batches, stop_after)
        for name in stages[key]:
            q, scales = gptq_quantize(model.get_submodule(name).weight, hessians[name], bits, group_size, act_order)
            replace(name, q, scales, hessians[name])
            advance()
