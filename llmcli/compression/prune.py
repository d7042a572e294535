"""Pruning: unstructured (magnitude, Wanda), N:M semi-structured, and attention-head removal.

Only the linear layers inside transformer blocks are pruned (attention q/k/v/o, feed-forward
up/gate/down); embeddings, position tables and the LM head stay dense.

- magnitude: zero the round(S·n) smallest |W| of each layer (Han et al. 2015); scope "row" ranks
  within each output row, "global" over all layers together.
- wanda: score |W_ij|·||X_j||₂, X the layer's inputs on calibration batches, and zero the round(S·n)
  lowest scores of each output row (Sun et al. 2023, "A Simple and Effective Pruning Approach for
  LLMs"); scope "layer" ranks the whole layer instead (the paper's sec. 5 finds that group better
  for image classifiers; on small GPTs here it is too). As in the paper's code, blocks are pruned in
  order and each block is calibrated on the outputs of the already pruned blocks before it.
- pattern N:M: in every group of M consecutive input weights of a row keep the N best scores
  (magnitude or Wanda), the layout sparse tensor cores run (Mishra et al. 2021: 2:4).
- heads: remove whole heads, so q/k/v/o really shrink. A head's importance is the mean L2 norm, over
  calibration tokens, of what it adds to the attention output (W_o[:, head] · z_head): exactly the
  change of that layer's output if the head alone were removed.
- experts: remove whole experts of a mixture of experts, the same number in every layer: those the router
  sends the fewest calibration tokens to. The report gives each removed expert's share of the routed tokens
  and what removing it alone costs: the calibration loss with its router logit at -inf, against none removed.

Unstructured zeros are stored densely: they save no memory and no time until a sparse kernel runs them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn

from llmcli.compression.calibration import run_calibration
from llmcli.runtime import family_loss
from llmcli.errors import UserError
from llmcli.models.blocks import Attention, MixtureOfExperts, TransformerStack
from llmcli.models.layout import block_linears, blocks
from llmcli.progress import SILENT, Progress

METHODS = ("magnitude", "wanda", "heads", "experts")
STRUCTURED = ("heads", "experts")  # whole units go, the same number per layer: no scope, no pattern
SCOPES = ("row", "layer", "global")  # the comparison group whose lowest scores go
DEFAULT_SPARSITY = 0.5


# ---------------------------------------------------------------- settings


@dataclass
class PruneSpec:
    method: str
    sparsity: float = DEFAULT_SPARSITY  # fraction of weights zeroed, or of heads removed per layer
    pattern: tuple[int, int] | None = None  # (N, M): keep N of every M consecutive input weights
    scope: str | None = None  # row, layer or global; None: row for wanda, layer for magnitude, unused otherwise
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        if self.scope is None and self.method not in STRUCTURED and self.pattern is None:
            self.scope = "row" if self.method == "wanda" else "layer"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["pattern"] = f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else None
        return data


def parse_pattern(text: str) -> tuple[int, int]:
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise UserError(f"--pattern {text!r} is not N:M; write it like 2:4 (keep 2 of every 4 weights)") from None
    if not 0 < n < m:
        raise UserError(f"--pattern {text}: need 0 < N < M (N weights kept of every M); use e.g. 2:4")
    return n, m


def resolve_spec(method: str | None, sparsity: float | None = None, pattern: str | None = None,
                 scope: str | None = None, calibration_batches: int = 8) -> PruneSpec:
    """Check the settings before any model is loaded.

    None sparsity = 0.5, or what the pattern implies; None scope = row for wanda, layer for magnitude.
    """
    if method not in METHODS:
        raise UserError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity {sparsity} must be in [0, 1) (the fraction pruned); e.g. --sparsity 0.5")
    if scope is not None and scope not in SCOPES:
        raise UserError(f"--scope {scope!r} is not one of {', '.join(SCOPES)}")
    if scope is not None and method in STRUCTURED:
        raise UserError(f"--scope is for --method magnitude or wanda ({method} go uniformly per layer); drop --scope")
    if scope == "global" and method == "wanda":
        raise UserError("--scope global is for --method magnitude (Wanda scores carry each layer's activation "
                        "scale, so they do not compare across layers); use --scope row or layer")
    if calibration_batches <= 0:
        raise UserError(f"--calibration-batches must be positive, got {calibration_batches}")
    parsed = None
    if pattern is not None:
        if method in STRUCTURED:
            raise UserError(f"--pattern is for --method magnitude or wanda, not {method}; drop --pattern")
        if scope is not None:
            raise UserError(f"--pattern sets its own groups of M weights, --scope {scope} another; drop one of them")
        parsed = parse_pattern(pattern)
        implied = 1 - parsed[0] / parsed[1]
        if sparsity is not None and not math.isclose(sparsity, implied):
            raise UserError(f"--pattern {pattern} means sparsity {implied:g}, not {sparsity:g}; drop --sparsity")
        sparsity = implied
    return PruneSpec(method, DEFAULT_SPARSITY if sparsity is None else sparsity, parsed, scope, calibration_batches)


def prune_count(sparsity: float, n: int) -> int:
    """How many of n are pruned: round(S·n), halves rounded up (0.5 of 5 weights prunes 3)."""
    return math.floor(sparsity * n + 0.5)


# ---------------------------------------------------------------- which layers


def layer_sparsity(linears: dict[str, nn.Linear]) -> tuple[list[dict], float]:
    """Zeros per layer as stored, and over all layers together."""
    rows, zeros, total = [], 0, 0
    for name, linear in linears.items():
        n_zero, n = int((linear.weight == 0).sum()), linear.weight.numel()
        rows.append({"name": name, "shape": list(linear.weight.shape), "zeros": n_zero, "sparsity": n_zero / n})
        zeros, total = zeros + n_zero, total + n
    return rows, zeros / total if total else 0.0


def check_pattern_fits(linears: dict[str, nn.Linear], pattern: tuple[int, int]) -> None:
    for name, linear in linears.items():
        if linear.in_features % pattern[1]:
            raise UserError(f"--pattern {pattern[0]}:{pattern[1]}: {name} has {linear.in_features} inputs, not a "
                            f"multiple of {pattern[1]}; choose an M that divides every layer's input width")


# ---------------------------------------------------------------- scores and masks


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Sun et al. 2023, eq. 1: S_ij = |W_ij| · ||X_j||₂ (weight: out x in, input_norm: in)."""
    return weight.abs().float() * input_norm[None, :].float()


def keep_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """True where a weight stays: exactly round(S·n) lowest scores dropped per row, or per layer."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        k = prune_count(sparsity, scores.shape[1])
        if k:
            keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    else:
        k = prune_count(sparsity, scores.numel())
        if k:
            keep.view(-1)[scores.flatten().topk(k, largest=False).indices] = False
    return keep


def n_m_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the N best scores of every group of M consecutive inputs in each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(m - n, dim=2, largest=False).indices, False)
    return keep.reshape(rows, cols)


def global_keep_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One ranking over all layers: exactly round(S·total) weights dropped overall, unevenly per layer."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = torch.ones_like(flat, dtype=torch.bool)
    k = prune_count(sparsity, flat.numel())
    if k:
        keep[flat.topk(k, largest=False).indices] = False
    parts = keep.split([s.numel() for s in scores.values()])
    return {name: part.view_as(s) for (name, s), part in zip(scores.items(), parts)}


def spec_keep_mask(scores: torch.Tensor, spec: PruneSpec) -> torch.Tensor:
    if spec.pattern:
        return n_m_keep_mask(scores, *spec.pattern)
    return keep_mask(scores, spec.sparsity, per_row=spec.scope == "row")


@torch.no_grad()
def apply_masks(linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor]) -> None:
    for name, keep in masks.items():
        linears[name].weight.mul_(keep.to(linears[name].weight.dtype))


# ---------------------------------------------------------------- calibration


@torch.no_grad()
def input_norms(model: nn.Module, batches: list[dict], linears: dict[str, nn.Linear], device: torch.device,
                stop_after: nn.Module | None = None, advance: Callable = lambda: None) -> dict[str, torch.Tensor]:
    """||X_j||₂ of every input feature j of each linear, over all calibration tokens."""
    squares = {name: torch.zeros(linear.in_features, device=device) for name, linear in linears.items()}

    def record(name):
        def hook(module, args):
            x = args[0].detach().float()
            squares[name] += x.pow(2).reshape(-1, x.shape[-1]).sum(0)
        return hook

    handles = [linear.register_forward_pre_hook(record(name)) for name, linear in linears.items()]
    run_calibration(model, batches, device, handles, stop_after, advance)
    return {name: s.sqrt() for name, s in squares.items()}


@torch.no_grad()
def head_importance(model: nn.Module, batches: list[dict], device: torch.device,
                    advance: Callable = lambda: None) -> dict[str, torch.Tensor]:
    """Per attention layer, one score per kv group (a head, or with GQA a kv head and its query heads):
    the mean over tokens of ||W_o[:, group] · z_group||₂, the group's own contribution to the layer output."""
    attentions = {name: m for name, m in model.named_modules() if isinstance(m, Attention)}
    totals = {name: torch.zeros(m.n_kv_heads, device=device) for name, m in attentions.items()}
    tokens = dict.fromkeys(attentions, 0)

    def record(name, attn):
        group_size = attn.n_heads // attn.n_kv_heads

        def hook(module, args):
            z = args[0].detach().float().reshape(-1, attn.n_kv_heads, group_size, attn.d_head)
            w = module.weight.float().reshape(-1, attn.n_kv_heads, group_size, attn.d_head)
            contribution = torch.einsum("ngrd,mgrd->ngm", z, w)  # (tokens, groups, d_model)
            totals[name] += contribution.norm(dim=-1).sum(0)
            tokens[name] += z.shape[0]
        return hook

    handles = [attn.o_proj.register_forward_pre_hook(record(name, attn)) for name, attn in attentions.items()]
    run_calibration(model, batches, device, handles, advance=advance)
    return {name: totals[name] / max(tokens[name], 1) for name in attentions}


# ---------------------------------------------------------------- unstructured and N:M pruning


def prune_weights(model: nn.Module, spec: PruneSpec, batches: list[dict], device: torch.device,
                  progress: Progress = SILENT) -> dict[str, torch.Tensor]:
    """Zero weights in place by magnitude or Wanda; returns the keep-masks (for recovery)."""
    linears = block_linears(model)
    if spec.pattern:
        check_pattern_fits(linears, spec.pattern)
    if spec.method == "magnitude":
        scores = {name: linear.weight.detach().abs().float() for name, linear in linears.items()}
        if spec.scope == "global":
            masks = global_keep_masks(scores, spec.sparsity)
        else:
            masks = {name: spec_keep_mask(s, spec) for name, s in scores.items()}
        apply_masks(linears, masks)
        return masks
    masks = {}
    in_order = blocks(model)
    with progress.task("wanda", len(in_order) * len(batches), unit="batches") as task:
        for block_name, block in in_order.items():  # in order: later blocks see the pruned earlier ones
            layers = {f"{block_name}.{name}": layer for name, layer in block_linears(block).items()}
            norms = input_norms(model, batches, layers, device, stop_after=block, advance=task.update)
            block_masks = {name: spec_keep_mask(wanda_scores(linear.weight, norms[name]), spec)
                           for name, linear in layers.items()}
            apply_masks(layers, block_masks)
            masks.update(block_masks)
    return masks


# ---------------------------------------------------------------- head pruning


def heads_to_remove(model: nn.Module, sparsity: float) -> int:
    """How many kv groups (heads, without GQA) each attention layer loses; refuses to remove them all."""
    config = model.config
    groups = config.n_kv_heads
    remove = prune_count(sparsity, groups)
    if remove >= groups:
        unit = "heads" if groups == config.n_heads else f"kv groups (GQA: {config.n_heads // groups} heads each)"
        most = (groups - 0.5) / groups
        raise UserError(f"--sparsity {sparsity:g} would remove all {groups} {unit} of every attention layer "
                        f"(round({sparsity:g}·{groups}) = {remove}); use --sparsity below {most:g}")
    return remove


def choose_heads(model: nn.Module, importance: dict[str, torch.Tensor], remove: int) -> dict[str, list[int]]:
    """The kv groups to remove per attention layer: the least important ones.

    A stack with a T5 relative position bias shares one bias table (a column per head) between its
    self-attention layers, so there the same heads go in every layer, ranked by importance summed over
    the stack. Cross-attention (T5 decoder) loses the same number of heads, chosen per layer, because
    the config has one n_heads for every attention.
    """
    rankings: dict[str, list[str]] = {}
    for stack_name, stack in model.named_modules():
        if not isinstance(stack, TransformerStack):
            continue
        for i, block in enumerate(stack.blocks):
            for attr in ("attn", "cross_attn"):
                if getattr(block, attr) is None:
                    continue
                name = f"{stack_name}.blocks.{i}.{attr}"
                shared = attr == "attn" and stack.rel_bias is not None
                rankings.setdefault(f"{stack_name}.self-attention" if shared else name, []).append(name)
    chosen = {}
    for names in rankings.values():
        total = sum(importance[name] for name in names)
        drop = sorted(total.topk(remove, largest=False).indices.tolist())
        chosen.update(dict.fromkeys(names, drop))
    return chosen


def _head_dims(heads: list[int], d_head: int, device: torch.device) -> torch.Tensor:
    """Row (or column) indices of the given heads in a (heads · d_head) projection."""
    return (torch.tensor(heads, device=device)[:, None] * d_head + torch.arange(d_head, device=device)).flatten()


def _keep_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[index].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[index].clone())
    linear.out_features = len(index)


def _keep_columns(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, index].clone())
    linear.in_features = len(index)


@torch.no_grad()
def remove_head_groups(attn: Attention, drop: list[int]) -> list[int]:
    """Cut kv groups (a kv head and its n_heads/n_kv_heads query heads) out of one layer; returns the kept query heads."""
    group_size = attn.n_heads // attn.n_kv_heads
    kept_groups = [g for g in range(attn.n_kv_heads) if g not in drop]
    kept_heads = [g * group_size + j for g in kept_groups for j in range(group_size)]
    device = attn.q_proj.weight.device
    q_index = _head_dims(kept_heads, attn.d_head, device)
    kv_index = _head_dims(kept_groups, attn.d_head, device)
    _keep_rows(attn.q_proj, q_index)
    _keep_rows(attn.k_proj, kv_index)
    _keep_rows(attn.v_proj, kv_index)
    _keep_columns(attn.o_proj, q_index)
    if attn.qk_norm == "projection":  # OLMo 2: a weight per channel of q and k, and their RMS over the kept heads
        attn.q_norm.weight = nn.Parameter(attn.q_norm.weight.detach()[q_index].clone())
        attn.k_norm.weight = nn.Parameter(attn.k_norm.weight.detach()[kv_index].clone())
    if attn.xl is not None:  # Transformer-XL positions: per-head projection rows and u, v
        _keep_rows(attn.xl.r_proj, q_index)
        attn.xl.u = nn.Parameter(attn.xl.u.detach()[kept_heads].clone())
        attn.xl.v = nn.Parameter(attn.xl.v.detach()[kept_heads].clone())
        attn.xl.n_heads = len(kept_heads)
    attn.n_heads, attn.n_kv_heads = len(kept_heads), len(kept_groups)
    return kept_heads


@torch.no_grad()
def prune_heads(model: nn.Module, drop: dict[str, list[int]]) -> list[dict]:
    """Remove the chosen kv groups from every attention layer and shrink the config to match.

    d_head stays; n_heads and n_kv_heads fall (d_attn = n_heads · d_head, so d_model no longer has to
    be a multiple of n_heads: config.json keeps d_head explicitly).
    """
    if len({len(groups) for groups in drop.values()}) > 1:
        raise ValueError("every attention layer must lose the same number of heads: the config has one n_heads")
    config = model.config
    modules = dict(model.named_modules())
    layers, kept_by_layer = [], {}
    for name, groups in drop.items():
        attn = modules[name]
        before = attn.n_heads
        kept_by_layer[name] = remove_head_groups(attn, groups)
        layers.append({"name": name, "heads_before": before, "heads_after": attn.n_heads,
                       "removed_heads": [h for h in range(before) if h not in kept_by_layer[name]]})
    for stack_name, stack in model.named_modules():
        if isinstance(stack, TransformerStack) and stack.rel_bias is not None:  # one bias column per head
            kept = kept_by_layer[f"{stack_name}.blocks.0.attn"]  # the same in every layer of the stack
            table = stack.rel_bias.embedding
            table.weight = nn.Parameter(table.weight.detach()[:, kept].clone())
            table.embedding_dim = len(kept)
    if layers:
        some = modules[layers[0]["name"]]
        config.n_heads, config.n_kv_heads = some.n_heads, some.n_kv_heads
    return layers


# ---------------------------------------------------------------- expert pruning


def mixtures(model: nn.Module) -> dict[str, MixtureOfExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MixtureOfExperts)}


def experts_to_remove(model: nn.Module, sparsity: float) -> int:
    """How many experts each mixture loses; refuses a dense model, and leaving fewer than a token's k."""
    config = model.config
    if not config.n_experts:
        raise UserError(f"--method experts needs a mixture of experts; {config.name} has none (n_experts = 0); use "
                        f"--method heads, magnitude or wanda")
    remove = prune_count(sparsity, config.n_experts)
    if config.n_experts - remove < config.experts_per_token:
        raise UserError(f"--sparsity {sparsity:g} would leave {config.n_experts - remove} of {config.n_experts} "
                        f"experts per layer, fewer than the {config.experts_per_token} each token uses; use a "
                        f"smaller --sparsity")
    return remove


@torch.no_grad()
def expert_usage(model: nn.Module, batches: list[dict], device: torch.device,
                 advance: Callable = lambda: None) -> dict[str, torch.Tensor]:
    """Per mixture, the share of the calibration tokens' routed (token, slot) pairs each expert took."""
    layers = mixtures(model)
    totals = {name: torch.zeros(len(m.experts), device=device) for name, m in layers.items()}

    def record(name):
        def hook(module, args, output):
            totals[name] += module.expert_load.to(totals[name].dtype)
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in layers.items()]
    run_calibration(model, batches, device, handles, advance=advance)
    return {name: total / total.sum().clamp(min=1) for name, total in totals.items()}


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: list[dict], device: torch.device) -> float:
    model.eval()
    return sum(family_loss(model, {k: v.to(device) for k, v in b.items()}).item() for b in batches) / len(batches)


@torch.no_grad()
def expert_cost(model: nn.Module, layer: MixtureOfExperts, expert: int, batches: list[dict],
                device: torch.device) -> float:
    """The calibration loss with `expert` of `layer` unreachable (its router logit -inf): what removing it costs."""
    def mask(module, args, logits):
        logits = logits.clone()
        logits[..., expert] = float("-inf")
        return logits

    handle = layer.router.register_forward_hook(mask)
    try:
        return calibration_loss(model, batches, device)
    finally:
        handle.remove()


def choose_experts(usage: dict[str, torch.Tensor], remove: int) -> dict[str, list[int]]:
    """The least-used experts of each mixture."""
    return {name: sorted(share.topk(remove, largest=False).indices.tolist()) for name, share in usage.items()}


@torch.no_grad()
def prune_experts(model: nn.Module, drop: dict[str, list[int]]) -> None:
    """Cut experts (their feed-forwards and router rows) out of every mixture; the config follows."""
    layers = mixtures(model)
    for name, removed in drop.items():
        layer = layers[name]
        kept = [e for e in range(len(layer.experts)) if e not in removed]
        _keep_rows(layer.router, torch.tensor(kept, device=layer.router.weight.device))
        layer.experts = nn.ModuleList(layer.experts[e] for e in kept)
    model.config.n_experts = len(next(iter(layers.values())).experts)
