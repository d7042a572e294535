"""`llmcli scaling plan`: the compute-optimal model and data size for a FLOP budget, C ≈ 6·N·D.

- Chinchilla (Hoffmann et al. 2022): N and D grow alike (C^0.5 each), about 20 tokens per parameter,
  so N = sqrt(C / 120) and D = 20·N.
- Kaplan et al. 2020 (figure 14): N = 1.3e9 · C^0.73 with C in PF-days (8.64e19 FLOPs), D = C / (6N),
  so D ∝ C^0.27.
- A fitted L(N, D) = E + A·N^−α + B·D^−β (Chinchilla eq. 4): N = G·(C/6)^(β/(α+β)), D = (C/6)^(α/(α+β)) / G,
  with G = (αA / βB)^(1/(α+β)).
"""

from __future__ import annotations

import math

from llmcli.config import load_toml, zoo_entries
from llmcli.errors import UserError
from llmcli.profiling.bench import run_bench
from llmcli.profiling.machine import machine_peaks
from llmcli.profiling.counts import count, tokens_for_compute, training_compute
from llmcli.profiling.memory import estimate_memory
from llmcli.runtime import default_seq_len, machine_memory, resolve_device
from llmcli.scaling.fit import Fit

CHINCHILLA_TOKENS_PER_PARAM = 20
KAPLAN_COEFFICIENT, KAPLAN_EXPONENT = 1.3e9, 0.73
PF_DAY = 1e15 * 86400


def chinchilla(compute: float) -> tuple[float, float]:
    n = math.sqrt(compute / (6 * CHINCHILLA_TOKENS_PER_PARAM))
    return n, CHINCHILLA_TOKENS_PER_PARAM * n


def kaplan(compute: float) -> tuple[float, float]:
    n = KAPLAN_COEFFICIENT * (compute / PF_DAY) ** KAPLAN_EXPONENT
    return n, tokens_for_compute(n, compute)


def from_fit(fit: Fit, compute: float) -> tuple[float, float]:
    if fit.form != "N,D":
        raise UserError("the fit is L(N) only; planning needs L(N, D): sweep several token budgets "
                        "(--tokens 1e5,3e5,1e6) and fit again")
    p = fit.params
    total = p["alpha"] + p["beta"]
    g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / total)
    return g * (compute / 6) ** (p["beta"] / total), (compute / 6) ** (p["alpha"] / total) / g


def allocation(rule, compute: float) -> dict:
    """N, D for `compute` and what doubling the compute does to each."""
    n, d = rule(compute)
    n2, d2 = rule(2 * compute)
    return {"params": n, "tokens": d, "tokens_per_param": d / n, "doubling_params": n2 / n, "doubling_tokens": d2 / d}


def nearest_zoo_entry(params: float, family: str = "gpt"):
    """The zoo entry of `family` whose parameter count is closest to `params` on a log scale."""
    best = None
    for name, path in zoo_entries().items():
        config = load_toml(path)
        if config.family != family:
            continue
        size = count(config).params
        distance = abs(math.log(size / params))
        if best is None or distance < best[0]:
            best = (distance, config, size)
    if best is None:
        raise UserError(f"the zoo has no {family} entry")
    return best[1], best[2]


def machine_time(config, params: float, tokens: float, measure: bool, device: str = "auto") -> dict:
    """Training time for `tokens` on this machine: a measured bench step if the model fits here, else a bound."""
    seq_len = default_seq_len(config)
    target = resolve_device(device)
    needed = estimate_memory(config, "train", batch_size=1, seq_len=seq_len, dtype="fp32",
                             device=target.type).total_bytes
    available = machine_memory(target)
    if not measure:
        return {"basis": "not measured (--no-measure)"}
    if needed < available / 2 and params <= 2e9:
        results, _ = run_bench(str(config.name), ["train"], [1], [seq_len], device=str(target), reps=2, warmup=1)
        rate = results[0].tokens_per_s
        return {"basis": f"measured: one {config.name} training step, batch 1, seq {seq_len}, fp32, {target}",
                "tokens_per_s": rate, "seconds": tokens / rate}
    flops = machine_peaks(target)["matmul_flops"]
    return {"basis": f"{config.name} needs {needed / 1e9:.3g} GB to train, this {target.type} has "
                     f"{available / 1e9:.3g} GB: a lower bound at the measured matmul peak "
                     f"({flops / 1e9:.0f} GFLOP/s, 100% utilisation)",
            "matmul_flops": flops, "seconds": training_compute(params, tokens) / flops, "lower_bound": True}


def plan(compute: float, fit: Fit | None = None, family: str = "gpt", measure: bool = True,
         device: str = "auto") -> dict:
    if not compute > 0 or not math.isfinite(compute):
        raise UserError(f"--compute {compute}: give a positive FLOP budget, e.g. 1e18")
    rules = {"chinchilla": allocation(chinchilla, compute), "kaplan": allocation(kaplan, compute)}
    if fit is not None:
        rules["fit"] = allocation(lambda c: from_fit(fit, c), compute)
        rules["fit"]["predicted_loss"] = float(fit.predict(rules["fit"]["params"], rules["fit"]["tokens"]))
    chosen = "fit" if fit is not None else "chinchilla"
    config, size = nearest_zoo_entry(rules[chosen]["params"], family)
    memory = estimate_memory(config, "train", batch_size=1, seq_len=min(2048, config.max_seq_len), dtype="bf16")
    tokens = rules[chosen]["tokens"]
    return {"compute": compute, "rules": rules, "nearest": {
        "rule": chosen, "name": config.name, "params": size, "tokens": tokens,
        "train_memory_bytes": memory.total_bytes,
        "train_memory_setting": f"batch 1, seq {min(2048, config.max_seq_len)}, bf16 mixed precision, AdamW, 1 GPU",
        "time": machine_time(config, size, tokens, measure, device)}}
