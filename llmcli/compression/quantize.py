"""Weight quantization: choosing the integers. int8 per output channel, int4 in groups, int8 with dynamic
activations; round to nearest (RTN) or GPTQ (gptq.py).

Symmetric: scale = absmax / (2^(b-1) - 1) per channel or group, so round-to-nearest is off by at most
scale / 2. The layer that holds the result, and its layout on disk, is llmcli.models.quantized; the
`llmcli quantize` command around this is quantize_dir.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmcli.compression.gptq import gptq_model
from llmcli.errors import UserError
from llmcli.models.layout import set_submodule
from llmcli.models.quantized import (FORMAT_VERSION, SCHEMES, QuantizedLinear, check_group_size, qrange,
                                     quantizable_layers, scheme_bits, symmetric_scales, untie_head)
from llmcli.progress import SILENT, Progress

METHODS = ("rtn", "gptq")


def check_scheme(scheme: str, method: str) -> None:
    if scheme not in SCHEMES:
        raise UserError(f"--scheme {scheme!r} is unknown; use one of {', '.join(SCHEMES)}")
    if method not in METHODS:
        raise UserError(f"--method {method!r} is unknown; use rtn (round to nearest) or gptq (calibrated)")


# ---------------------------------------------------------------- the numbers


def quantize_with_scales(weight: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Round-to-nearest integers (int8 tensor, (N, K)) for given group scales."""
    rows, cols = weight.shape
    lo, hi = qrange(bits)
    grouped = weight.detach().float().reshape(rows, cols // group_size, group_size) / scales[..., None].float()
    return grouped.round().clamp(lo, hi).to(torch.int8).reshape(rows, cols)


def quantize_rtn(weight: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest: (q int8 (N, K), scales float32 (N, K / group_size))."""
    scales = symmetric_scales(weight, group_size, bits)
    return quantize_with_scales(weight, scales, group_size, bits), scales


# ---------------------------------------------------------------- the model


def quantize_model(model: nn.Module, scheme: str, group_size: int = 128, method: str = "rtn",
                   include_head: bool = False, calibration: list[dict] | None = None, act_order: bool = False,
                   progress: Progress = SILENT) -> tuple[dict, dict]:
    """Quantize `model`'s linear layers in place. Returns (quantization.json spec, per-layer errors).

    `calibration` (batches as the trainer's) is required by GPTQ; RTN needs no data.
    """
    check_scheme(scheme, method)
    if method == "gptq" and not calibration:
        raise UserError("--method gptq needs calibration batches; give --calibration-data PATH or a corpus")
    if include_head:
        untie_head(model)
    names = quantizable_layers(model, include_head)
    if not names:
        raise UserError(f"{model.config.name}: no linear layers to quantize")
    check_group_size(model, names, scheme, group_size)
    bits = scheme_bits(scheme)
    stored_group = group_size if bits == 4 else None
    errors: dict[str, dict] = {}

    def replace(name: str, q: torch.Tensor, scales: torch.Tensor, hessian: torch.Tensor | None) -> None:
        linear = model.get_submodule(name)
        layer = QuantizedLinear.from_linear(linear, scheme, stored_group, q, scales)
        errors[name] = layer_error(linear.weight.detach(), layer.dequantized_weight(), hessian)
        set_submodule(model, name, layer)

    with torch.no_grad(), progress.task(f"quantize ({method} {scheme})", len(names), unit="layers") as task:
        if method == "gptq":
            gptq_model(model, names, calibration, bits, group_size if bits == 4 else None, act_order, replace,
                       task.update)
        else:
            for name in names:
                weight = model.get_submodule(name).weight
                q, scales = quantize_rtn(weight, group_size if bits == 4 else weight.shape[1], bits)
                replace(name, q, scales, None)
                task.update()
    spec = {"format_version": FORMAT_VERSION, "scheme": scheme, "bits": bits, "group_size": stored_group,
            "symmetric": True, "method": method, "act_order": act_order if method == "gptq" else None,
            "include_head": include_head, "layers": names}
    return spec, errors


def layer_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None = None) -> dict:
    """Weight error, and with calibration inputs X (hessian = 2 XᵀX / n) the relative output error
    ||(W - Ŵ) X|| / ||W X||."""
    weight, delta = weight.float(), weight.float() - approx.float()
    result = {"weight_mean_abs_error": delta.abs().mean().item(),
              "weight_rel_error": (delta.norm() / weight.norm().clamp(min=1e-12)).item()}
    if hessian is not None:
        out_err = ((delta @ hessian) * delta).sum()
        out_ref = ((weight @ hessian) * weight).sum().clamp(min=1e-12)
        result["output_rel_error"] = (out_err / out_ref).clamp(min=0).sqrt().item()
    return result
