"""Training on several processes under torchrun: DDP, FSDP2 and tensor parallelism.

One process per device. `torchrun --nproc-per-node N -m llmcli train ...` starts them, or `--nproc N`,
which runs torchrun in the llmcli process itself (`launch`). The ranks form a ("dp", "tp") mesh,
rank = dp_rank * tp + tp_rank:

- data parallel (dp = world / tp): every dp rank takes its own rows of the global batch of each step,
  batch_size rows per rank (`ShardedData`), so dp ranks with batch b train like one process with batch
  dp * b; DDP keeps a replica of the model on each rank, FSDP (`fully_shard` per block, then the root)
  shards weights, gradients and optimizer states;
- tensor parallel (tp): q/k/v/up/gate split by output features, o/down by input features
  (Megatron-LM, Shoeybi et al. 2019), so each tp rank holds n_heads / tp heads and d_ff / tp hidden units.

Checkpoints are sharded (checkpoint.py: torch.distributed.checkpoint, each rank writing its shard); the
exported model directory is the plain single-process format.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.run as torchrun
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel

from llmcli.errors import UserError
from llmcli.models.blocks import Attention, RelativePositionBias
from llmcli.models.layout import COLUMN_PARALLEL, block_linears, blocks, projection_kind
from llmcli.runtime import resolve_device, torch_dtype
from llmcli.training.checkpoint import complete_checkpoints

STRATEGIES = ("ddp", "fsdp")
LAUNCHED = "LLMCLI_LAUNCHED"  # set by `launch`: the parent reports a rank's error, the rank stays quiet


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


# ---------------------------------------------------------------- checks


def check_flags(strategy: str | None, tp: int | None, cpu_offload: bool | None, world: int) -> None:
    """Refuse a layout that cannot run, before any process starts."""
    strategy, tp = strategy or "ddp", tp or 1
    if world < 1:
        raise UserError(f"--nproc must be at least 1, got {world}")
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if tp < 1:
        raise UserError(f"--tp must be at least 1, got {tp}")
    if world % tp:
        fits = [n for n in range(1, world + 1) if world % n == 0]
        raise UserError(f"--tp {tp} does not divide the {world} processes (tp x dp must equal the number of "
                        f"processes); use --tp {' or '.join(map(str, fits))}, or change --nproc")
    if tp > 1 and world > tp and strategy == "ddp":
        raise UserError(f"--tp {tp} on {world} processes makes {world // tp} data-parallel groups, which needs "
                        f"--strategy fsdp (a 2-D dp x tp mesh); with ddp, use --tp {world}")
    if cpu_offload and strategy != "fsdp":
        raise UserError("--cpu-offload offloads FSDP's shards; add --strategy fsdp")
    if cpu_offload and not torch.cuda.is_available():
        raise UserError("--cpu-offload moves FSDP's shards from the GPU to CPU memory; without CUDA they are "
                        "in CPU memory already: drop --cpu-offload")


def check_model(config, tp: int) -> None:
    """Tensor parallelism splits heads and feed-forward units evenly across the tp ranks."""
    if tp <= 1:
        return
    for name in ("n_heads", "n_kv_heads", "d_ff"):
        value = getattr(config, name)
        if value % tp:
            raise UserError(f"{config.name}: {name} = {value} is not divisible by --tp {tp}; tensor parallelism "
                            f"gives each rank {name} / tp; use a --tp that divides {value}")
    if config.position == "transformer_xl":
        raise UserError(f"{config.name}: Transformer-XL positions keep per-head parameters that --tp does not "
                        f"split; train it without --tp")


# ---------------------------------------------------------------- the process group


@dataclass
class Parallel:
    """This process's place in the job and what to do with the model."""

    strategy: str
    tp: int
    cpu_offload: bool
    rank: int
    local_rank: int
    world: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mixed_precision: bool = False  # FSDP casts parameters itself; the trainer then skips autocast
    mesh: object = None
    owns_group: bool = True  # start() made the process group, so stop() ends it

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors (FSDP or TP), not plain replicas."""
        return self.strategy == "fsdp" or self.tp > 1

    def barrier(self) -> None:
        dist.barrier()

    def use_device(self, name: str) -> torch.device:
        """cuda:LOCAL_RANK for --device auto/cuda on a CUDA machine, else the CPU."""
        kind = resolve_device(name).type
        self.device = torch.device("cuda", self.local_rank) if kind == "cuda" else torch.device("cpu")
        return self.device

    def mean(self, value: float) -> float:
        """The mean of a per-rank number over the data-parallel ranks (tp ranks hold the same value)."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world

    def any(self, flag: bool) -> bool:
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(tensor)
        return bool(tensor.item())

    def wrap(self, model: torch.nn.Module, precision: str) -> torch.nn.Module:
        """Tensor-parallelize, then wrap for data parallelism (DDP) or shard (FSDP). Call before the optimizer."""
        if precision == "fp16" and self.sharded:
            raise UserError("--precision fp16 with --strategy fsdp or --tp is not supported (the loss scaler's "
                            "overflow check would see only this rank's shard); use --precision bf16")
        self.mesh = init_device_mesh(self.device.type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
        if self.tp > 1:
            tensor_parallel(model, self.mesh["tp"])
        if self.strategy == "fsdp":
            self.mixed_precision = self.device.type == "cuda" and precision in ("bf16", "fp16")
            return _fully_shard(model, self.mesh["dp"], precision if self.mixed_precision else None,
                                self.cpu_offload)
        if self.dp > 1 or self.tp == 1:
            # gradients as views into the all-reduce buckets: no second copy of every gradient
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None, gradient_as_bucket_view=True)
        return model

    def no_sync(self, model, last: bool):
        """DDP: skip the gradient all-reduce on every micro-batch but the last of a step."""
        if last or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over the whole model when its gradients are shards (FSDP) or mix shards with
        replicas (TP), where torch's own refuses mixed meshes. A shard's squared norm counts once per
        distinct shard: divided by the ranks that hold a copy of it."""
        parameters = list(parameters)
        grads = [p.grad for p in parameters if p.grad is not None]
        if not any(isinstance(g, DTensor) for g in grads):
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        total = torch.zeros((), dtype=torch.float32, device=locals_[0].device)
        for grad, local in zip(grads, locals_):
            copies = self.world
            if isinstance(grad, DTensor):
                copies //= math.prod(grad.device_mesh.size(i) for i, p in enumerate(grad.placements)
                                     if p.is_shard())
            total += local.detach().float().pow(2).sum() / copies
        dist.all_reduce(total)
        norm = total.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        with torch.no_grad():
            for local in locals_:
                local.mul_(coef.to(local.device, local.dtype))
        return norm

    def gather_model(self, model: torch.nn.Module, build: Callable[[], torch.nn.Module]):
        """The full weights, gathered to rank 0 on the CPU and loaded into `build()`, a plain copy of the
        model; None on the other ranks. Every rank must call it."""
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        plain = build()
        plain.load_state_dict(state, assign=True)  # assign: `build` may make the model on the meta device
        return plain.eval()


def start(strategy: str | None, tp: int | None, cpu_offload: bool | None) -> Parallel | None:
    """Join the process group when run by torchrun; None for a single process.

    The backend is gloo for CPU tensors and NCCL for CUDA ones. Refuses parallel flags without torchrun.
    """
    if not under_torchrun():
        asked = [name for name, value in (("--strategy", strategy), ("--cpu-offload", cpu_offload)) if value]
        asked += ["--tp"] if (tp or 1) != 1 else []
        if asked:
            raise UserError(f"{' and '.join(asked)} {'needs' if len(asked) == 1 else 'need'} several processes: "
                            f"add --nproc N to launch them, or run the command under torchrun")
        return None
    world, rank, local_rank = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    check_flags(strategy, tp, cpu_offload, world)
    owns_group = not dist.is_initialized()
    if owns_group:
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return Parallel(strategy or "ddp", tp or 1, bool(cpu_offload), rank, local_rank, world, owns_group=owns_group)


def stop(parallel: Parallel | None) -> None:
    if parallel is not None and parallel.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_main(parallel: Parallel | None, fn: Callable):
    """fn() on rank 0 only, its result (or its UserError) handed to every rank. For work that writes
    files or must not differ between ranks (clearing the run directory, training the tokenizer)."""
    if parallel is None:
        return fn()
    box = [None]
    if parallel.is_main:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


# ---------------------------------------------------------------- the model


def tensor_parallel(model: torch.nn.Module, mesh) -> None:
    """Split every block's projections across the tp ranks; attention then runs on the local heads.

    Column-parallel q/k/v/up/gate give each rank whole heads (and d_ff / tp units); row-parallel o/down
    sum the partial outputs. T5's relative position bias, one column per head, is split by head too.
    """
    tp = mesh.size()
    for block in blocks(model).values():
        layers = block_linears(block)
        for name, layer in layers.items():
            if type(layer) is not torch.nn.Linear:
                raise UserError(f"--tp splits the model's own projections, but {name} is a "
                                f"{type(layer).__name__}; use --tp with --method full")
        plan = {name: ColwiseParallel() if projection_kind(name) in COLUMN_PARALLEL else RowwiseParallel()
                for name in layers}
        parallelize_module(block, mesh, plan)
    for module in list(model.modules()):
        if isinstance(module, RelativePositionBias):
            parallelize_module(module, mesh, {"embedding": ColwiseParallel()})
    for module in model.modules():
        if isinstance(module, Attention):
            module.n_heads //= tp
            module.n_kv_heads //= tp


def _fully_shard(model: torch.nn.Module, mesh, precision: str | None, cpu_offload: bool) -> torch.nn.Module:
    """FSDP2: each block its own unit (gathered just before it runs), the rest (embeddings, norms, heads)
    in the root unit."""
    options = {"mesh": mesh, "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    if precision is not None:  # 16-bit compute, fp32 gradient reduction and master weights
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch_dtype(precision), reduce_dtype=torch.float32)
    for block in blocks(model).values():
        fully_shard(block, **options)
    return fully_shard(model, **options)


# ---------------------------------------------------------------- data


class ShardedData:
    """Rank r of dp takes rows [r*b, (r+1)*b) of each global batch (dp * b rows, built by `data`).

    tokens_per_batch stays the global figure, so rank 0 reports the job's tokens/s.
    """

    def __init__(self, data, dp_rank: int, dp: int) -> None:
        self.data, self.dp_rank, self.dp = data, dp_rank, dp
        self.tokens_per_batch = data.tokens_per_batch

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        batch = self.data.batch(step)
        rows = len(next(iter(batch.values())))
        if rows % self.dp:
            raise ValueError(f"a global batch of {rows} rows does not split over {self.dp} ranks")
        b = rows // self.dp
        return {k: v[self.dp_rank * b:(self.dp_rank + 1) * b] for k, v in batch.items()}


# ---------------------------------------------------------------- launching and failures


def launch(nproc: int, argv: list[str], strategy: str | None, tp: int | None, cpu_offload: bool | None,
           config=None, run_dir: Path | None = None, log: Callable[[str], None] = print) -> int:
    """Run `python -m llmcli ARGV` as nproc processes on this machine under torchrun; returns the exit code.

    torchrun stops every rank when one fails; the failing rank's error is reported here (exit code 2 for
    bad input, 1 for a crash), with the last complete checkpoint to resume from.
    """
    if under_torchrun():
        raise UserError("--nproc launches torchrun itself; under torchrun, leave --nproc out")
    check_flags(strategy, tp, cpu_offload, nproc)
    if config is not None:
        check_model(config, tp or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHED] = "1"
    args = torchrun.get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "llmcli", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        rank, failure = _root_cause(e)
        log(f"error: rank {rank} failed: {_failure_message(failure)}")
        log(f"torchrun stopped the other {nproc - 1} rank(s).{_resume_hint(run_dir)}")
        return 2 if failure.exitcode == 2 else 1
    return 0


def _root_cause(error) -> tuple[int, object]:
    """The rank that failed first: a rank's failure makes its peers fail in their next collective."""
    def when(item):
        rank, failure = item
        info = failure.error_file_data.get("message", {})
        precise = info.get("extraInfo", {}).get("time") if isinstance(info, dict) else None
        return (precise if precise is not None else float(failure.timestamp), rank)

    return min(error.failures.items(), key=when)


def _failure_message(failure) -> str:
    if not failure.error_file_data:  # it left no error file: killed by a signal, or failed before llmcli ran
        return failure.message if failure.signal_name() != "<N/A>" else f"exit code {failure.exitcode} (see above)"
    message = failure.message
    return message.get("message", "") if isinstance(message, dict) else message


def _resume_hint(run_dir: Path | None) -> str:
    if run_dir is None:
        return ""
    checkpoints = complete_checkpoints(Path(run_dir))
    if not checkpoints:
        return " No checkpoint was written yet."
    return f" The last complete checkpoint is {checkpoints[-1]}; continue with the same command and --resume."


@contextlib.contextmanager
def rank_errors():
    """Under torchrun: write this rank's error where torchrun collects it (its report, and `launch`'s).

    A UserError names the rank; under `launch` the rank exits 2 quietly and the parent prints it once.
    """
    if not under_torchrun():
        yield
        return
    rank = int(os.environ["RANK"])
    try:
        yield
    except UserError as e:
        _record(str(e))
        if os.environ.get(LAUNCHED):
            raise SystemExit(2) from None
        raise UserError(f"rank {rank}: {e}") from None
    except Exception as e:
        _record(f"{type(e).__name__}: {e}")
        raise


def _record(message: str) -> None:
    """torchrun's error-file format (torch.distributed.elastic ErrorHandler), plus a precise time."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    now = time.time()
    data = {"message": {"message": message, "extraInfo": {"py_callstack": traceback.format_exc(),
                                                          "timestamp": str(int(now)), "time": now}}}
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(data))
