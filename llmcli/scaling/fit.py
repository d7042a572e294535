"""Fitting scaling laws to runs: L(N) = E + A·N^(−α), and L(N, D) = E + A·N^(−α) + B·D^(−β).

As Hoffmann et al. 2022 (Chinchilla, approach 3): minimise a Huber loss (δ = 1e-3) between the log of
the predicted and the observed loss with L-BFGS, from a grid of starting points, in the parameters
(a = log A, α, e = log E, b = log B, β). Confidence intervals come from refitting bootstrap resamples
of the runs (percentiles 2.5 and 97.5).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmcli.errors import UserError
from llmcli.profiling.counts import training_compute

RUNS_FILE = "runs.jsonl"
HUBER_DELTA = 1e-3


@dataclass
class Run:
    name: str
    n: float  # non-embedding parameters
    d: float  # training tokens
    loss: float  # final validation loss
    dataset: str = ""
    compute: float = 0.0  # ≈ 6·N·D

    @classmethod
    def from_dict(cls, row: dict, where: str) -> "Run":
        try:
            run = cls(name=str(row.get("name", "?")), n=float(row["n"]), d=float(row["d"]), loss=float(row["loss"]),
                      dataset=str(row.get("dataset", "")), compute=float(row.get("compute", training_compute(row["n"], row["d"]))))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: a run needs numeric 'n', 'd' and 'loss' ({e}); "
                            f"use a runs.jsonl written by `llmcli scaling sweep`") from None
        if run.n <= 0 or run.d <= 0 or not run.loss > 0 or not math.isfinite(run.loss):
            raise UserError(f"{where}: run {run.name} has n={run.n}, d={run.d}, loss={run.loss}; all must be "
                            f"positive and finite")
        return run


@dataclass
class Fit:
    form: str  # "N" or "N,D"
    params: dict[str, float]  # E, A, alpha (and B, beta)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    runs: int = 0
    residual_rms: float = 0.0  # of log loss

    def predict(self, n, d=None):
        p = self.params
        n = torch.as_tensor(n, dtype=torch.float64)
        loss = p["E"] + p["A"] * n ** -p["alpha"]
        if self.form == "N,D":
            loss = loss + p["B"] * torch.as_tensor(d, dtype=torch.float64) ** -p["beta"]
        return loss

    def to_dict(self) -> dict:
        return asdict(self)


def read_runs(ref: str | Path, force: bool = False) -> list[Run]:
    """Runs from a sweep directory (its runs.jsonl) or a JSONL file; one dataset unless `force`."""
    path = Path(ref)
    if path.is_dir():
        path = path / RUNS_FILE
    if not path.is_file():
        raise UserError(f"{ref}: no runs file; give a `llmcli scaling sweep` directory or its {RUNS_FILE}")
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not JSON ({e.msg})") from None
            runs.append(Run.from_dict(row, f"{path}:{number}"))
    datasets = sorted({r.dataset for r in runs})
    if len(datasets) > 1 and not force:
        raise UserError(f"{path}: runs come from {len(datasets)} datasets ({', '.join(datasets[:3])}); losses on "
                        f"different data are not comparable; fit one dataset, or pass --force")
    return runs


def _huber(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() <= HUBER_DELTA, 0.5 * x**2, HUBER_DELTA * (x.abs() - 0.5 * HUBER_DELTA))


def _fit_once(log_n: torch.Tensor, log_d: torch.Tensor | None, log_loss: torch.Tensor,
              starts: list[tuple[float, ...]]) -> tuple[list[float], float]:
    """Best L-BFGS fit of the log-space parameters over the starting points; returns (params, objective)."""
    best, best_value = None, math.inf
    for start in starts:
        theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-12,
                                      tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def objective():
            optimizer.zero_grad()
            terms = [theta[0] - theta[1] * log_n, theta[2].expand_as(log_n)]
            if log_d is not None:
                terms.append(theta[3] - theta[4] * log_d)
            predicted = torch.logsumexp(torch.stack(terms), dim=0)  # log(A·N^-α + E (+ B·D^-β))
            value = _huber(predicted - log_loss).sum()
            value.backward()
            return value

        try:
            optimizer.step(objective)
        except RuntimeError:
            continue
        value = float(objective().detach())
        if math.isfinite(value) and value < best_value:
            best, best_value = theta.detach().tolist(), value
    if best is None:
        raise UserError("the fit did not converge from any starting point; check the runs' losses")
    return best, best_value


def _starts(joint: bool, min_loss: float) -> list[tuple[float, ...]]:
    """A small grid of starting points; E starts below the lowest observed loss."""
    e = math.log(0.5 * min_loss)
    grid = [(a, alpha, e) for a in (0.0, 5.0, 10.0) for alpha in (0.2, 0.5)]
    return grid if not joint else [s + (b, beta) for s in grid for b, beta in ((5.0, 0.2), (5.0, 0.5))]


def _to_params(theta: list[float], joint: bool) -> dict[str, float]:
    params = {"E": math.exp(theta[2]), "A": math.exp(theta[0]), "alpha": theta[1]}
    if joint:
        params.update(B=math.exp(theta[3]), beta=theta[4])
    return params


def fit_runs(runs: list[Run], form: str = "auto", bootstrap: int = 200, seed: int = 0) -> Fit:
    """Fit L(N) (one token budget) or L(N, D) (runs varying both); `form` is auto, N or N,D."""
    distinct_n, distinct_d = len({r.n for r in runs}), len({r.d for r in runs})
    if form == "auto":
        form = "N,D" if distinct_d > 1 and distinct_n > 1 else "N"
    if form not in ("N", "N,D"):
        raise UserError(f"--form {form!r}: use N, N,D or auto")
    joint = form == "N,D"
    constants = 5 if joint else 3
    if len(runs) < constants:
        raise UserError(f"{len(runs)} runs cannot fit the {constants} constants of L({form}); "
                        f"add runs (more models{' or token budgets' if joint else ''}) to the sweep")
    if distinct_n < 2 or (joint and distinct_d < 2):
        raise UserError(f"the runs need at least 2 model sizes{' and 2 token budgets' if joint else ''} "
                        f"to fit L({form}); they have {distinct_n} size(s), {distinct_d} budget(s)")

    def solve(sample: list[Run], starts) -> tuple[list[float], float]:
        log_n = torch.tensor([math.log(r.n) for r in sample], dtype=torch.float64)
        log_d = torch.tensor([math.log(r.d) for r in sample], dtype=torch.float64) if joint else None
        log_loss = torch.tensor([math.log(r.loss) for r in sample], dtype=torch.float64)
        return _fit_once(log_n, log_d, log_loss, starts)

    theta, _ = solve(runs, _starts(joint, min(r.loss for r in runs)))
    result = Fit(form=form, params=_to_params(theta, joint), runs=len(runs))
    predicted = result.predict([r.n for r in runs], [r.d for r in runs])
    observed = torch.tensor([r.loss for r in runs], dtype=torch.float64)
    result.residual_rms = float((predicted.log() - observed.log()).pow(2).mean().sqrt())
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {k: [] for k in result.params}
    for _ in range(bootstrap):
        resample = [rng.choice(runs) for _ in runs]
        if len({r.n for r in resample}) < 2 or (joint and len({r.d for r in resample}) < 2):
            continue
        try:
            boot, _ = solve(resample, [tuple(theta)])  # start from the full fit: fast, and the same basin
        except UserError:
            continue
        for key, value in _to_params(boot, joint).items():
            samples[key].append(value)
    for key, values in samples.items():
        if len(values) >= 10:
            values.sort()
            result.intervals[key] = (values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))])
    return result
