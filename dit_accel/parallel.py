"""Beyond one GPU: dit_accel under diffusers context parallelism, and work split across processes.

Two independent things live here.

1. **One generation on several GPUs** (``transformer.enable_parallelism(config=ContextParallelConfig(
   ulysses_degree=n))``). Under Ulysses, diffusers' native backend all-to-alls q, k, v and calls
   ``F.scaled_dot_product_attention`` on ``(B, H / n, S_full, D)``: every rank sees the whole sequence for its
   slice of the heads. Our site interceptor catches that call, so the per-head patterns, rho and residuals are
   built and cached per rank for its own heads, unchanged. The one decision that mixes heads, the adaptive
   refresh (mean LSE drift over all heads), is averaged over the Ulysses group by :func:`head_sum_count` so every rank
   refreshes on the same step as a single process would. Ring and unified attention merge partial results by
   LSE, which the native backend cannot return, and backends other than ``native`` run their own kernels that
   we cannot intercept under context parallelism: both are refused by :func:`check_context_parallel`, at
   ``accelerate()`` time and again at every forward (parallelism may be enabled after ``accelerate``).

2. **Many generations on several GPUs** (``dit-accel render --batch-file`` under ``accelerate launch`` or
   ``torchrun``): :func:`shard` gives each rank its items, each rank renders and writes its own files, and rank 0
   merges the per-item records into one summary (:func:`merge_records`, :func:`render_batch`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "SUPPORTED",
    "barrier",
    "check_context_parallel",
    "context_parallel_config",
    "cpu_device_count_workaround",
    "describe",
    "enter_forward",
    "head_sum_count",
    "local_rank",
    "merge_records",
    "rank_world",
    "read_prompts",
    "render_batch",
    "shard",
]

T = TypeVar("T")

#: What :func:`check_context_parallel` accepts, quoted in its errors.
SUPPORTED = (
    "dit_accel supports diffusers context parallelism in Ulysses mode only "
    "(ContextParallelConfig(ulysses_degree=n), ring_degree 1, ulysses_anything allowed) with the 'native' "
    "attention backend"
)

#: Process group of the Ulysses head split of the forward being run (None: one process holds every head).
_HEAD_GROUP: ContextVar[Any] = ContextVar("dit_accel_head_group", default=None)
#: Transformers whose current parallel config already passed the check (keyed weakly; value: the config's id).
_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()


# -- context parallelism: detection and refusal ---------------------------------------------------------------


def context_parallel_config(transformer: torch.nn.Module) -> Any | None:
    """The ``ContextParallelConfig`` that ``enable_parallelism`` put on ``transformer``, or None.

    Reads ``transformer._parallel_config`` (set by ``ModelMixin.enable_parallelism``; one attribute lookup, as
    this runs at every forward); a module without that attribute (not a ``ModelMixin``) has its attention
    processors' ``_parallel_config`` read instead.
    """
    config = getattr(transformer, "_parallel_config", None)
    if config is None and not hasattr(transformer, "_parallel_config"):
        for module in transformer.modules():
            processor = getattr(module, "processor", None)
            config = getattr(processor, "_parallel_config", None)
            if config is not None:
                break
    if config is None:
        return None
    # ParallelConfig wraps it; a bare ContextParallelConfig (ring_degree attribute) is accepted too.
    return config if hasattr(config, "ring_degree") else getattr(config, "context_parallel_config", None)


def _backends(transformer: torch.nn.Module) -> set[str]:
    """Attention backends the processors of ``transformer`` dispatch to (None resolves to the active one)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    names: set[str] = set()
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        backend = processor._attention_backend
        if backend is None:
            backend = _AttentionBackendRegistry.get_active_backend()[0]
        names.add(getattr(backend, "value", str(backend)))
    return names


def check_context_parallel(transformer: torch.nn.Module) -> Any | None:
    """Raise ``ValueError`` unless ``transformer`` runs single-process or in a supported Ulysses mode.

    Returns the ``ContextParallelConfig`` (None without context parallelism).
    """
    cp = context_parallel_config(transformer)
    if cp is None:
        return None
    ring = int(getattr(cp, "ring_degree", 1) or 1)
    ulysses = int(getattr(cp, "ulysses_degree", 1) or 1)
    if ring > 1:
        mode = "unified (ring x Ulysses)" if ulysses > 1 else "ring"
        raise ValueError(
            f"{type(transformer).__name__} has context parallelism in {mode} mode (ring_degree={ring}, "
            f"ulysses_degree={ulysses}); {SUPPORTED}. Ring attention merges partial outputs by their LSE over "
            "global key positions, which the native backend cannot return. Use "
            f"ContextParallelConfig(ulysses_degree={ring * ulysses}) (the head count must be divisible by it, "
            "or set ulysses_anything=True), or remove dit_accel (handle.remove()) to run ring attention densely."
        )
    other = sorted(_backends(transformer) - {"native"})
    if other:
        raise ValueError(
            f"{type(transformer).__name__} uses attention backend(s) {', '.join(map(repr, other))} under context "
            f"parallelism; {SUPPORTED}: their context-parallel path calls its own kernel instead of "
            "F.scaled_dot_product_attention, so dit_accel would never see the attention and every call would stay "
            "dense. Call transformer.set_attention_backend('native') before enable_parallelism (dense calls still "
            "reach cuDNN / flash kernels through SDPA's own dispatch)."
        )
    return cp


def _ulysses_group(cp: Any) -> Any | None:
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is None or int(getattr(cp, "ulysses_degree", 1) or 1) <= 1:
        return None
    return mesh.get_group()


def enter_forward(transformer: torch.nn.Module) -> None:
    """Called at the start of every accelerated transformer forward: re-check the parallel config (it may have
    been enabled after ``accelerate``) and publish the Ulysses group for :func:`head_sum_count`.

    Costs one attribute lookup when nothing changed since the last forward.
    """
    cp = context_parallel_config(transformer)
    if cp is None:
        _HEAD_GROUP.set(None)
        return
    if _CHECKED.get(transformer) != id(cp):
        check_context_parallel(transformer)
        _CHECKED[transformer] = id(cp)
    _HEAD_GROUP.set(_ulysses_group(cp))


def head_sum_count(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``stack([total, count])`` summed over every rank's heads under Ulysses (this rank's alone otherwise).

    Used for the decisions that mix heads (adaptive refresh), so that all ranks decide alike and as one process
    holding every head would. Stays on the device (no host sync); every rank of the group must call it the same
    number of times.
    """
    acc = torch.stack([total.double(), count.double()])
    group = _HEAD_GROUP.get()
    if group is None:
        return acc
    import torch.distributed as dist

    device = acc.device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    acc = acc.to(device)
    dist.all_reduce(acc, group=group)
    return acc


def describe(transformer: torch.nn.Module) -> dict[str, Any] | None:
    """What a rank's stats cover under context parallelism (None without it): its rank and the Ulysses degree."""
    cp = context_parallel_config(transformer)
    if cp is None:
        return None
    return {
        "mode": "ulysses",
        "ulysses_degree": int(getattr(cp, "ulysses_degree", 1) or 1),
        "rank": getattr(cp, "_rank", None),
        "world_size": getattr(cp, "_world_size", None),
        "note": "stats count this rank's head slice only",
    }


@contextlib.contextmanager
def cpu_device_count_workaround() -> Iterator[None]:
    """Let ``enable_parallelism`` run on a CPU-only torch build (tests, smoke runs with gloo).

    diffusers 0.42.1 picks the device as ``rank % torch.accelerator.device_count()``, which divides by zero when
    there is no accelerator; inside this block the count reads 1 (only when it is 0).
    """
    original = torch.accelerator.device_count
    if original() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = original  # type: ignore[assignment]


# -- work split across processes ------------------------------------------------------------------------------


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from the launcher's environment
    (``RANK``/``WORLD_SIZE`` from torchrun and accelerate launch), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``), the GPU it should use."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def shard(items: Sequence[T], rank: int, world: int) -> list[tuple[int, T]]:
    """The (index, item) pairs rank ``rank`` of ``world`` handles: round-robin, so ranks get equal shares of a
    list sorted by cost; the indices let :func:`merge_records` restore the original order."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank!r}, world={world!r}: need world >= 1 and 0 <= rank < world")
    return [(i, item) for i, item in enumerate(items) if i % world == rank]


def merge_records(records: Sequence[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """Records of every rank (each with an ``index``) in original order; raises when any index is missing or
    duplicated, which means a rank failed or two runs wrote into the same folder."""
    by_index: dict[int, dict[str, Any]] = {}
    for record in records:
        index = int(record["index"])
        if index in by_index:
            raise ValueError(f"item {index} was recorded twice; is another run writing into the same folder?")
        by_index[index] = record
    missing = sorted(set(range(total)) - set(by_index))
    if missing:
        raise ValueError(f"no record for item(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}; did a rank fail?")
    return [by_index[i] for i in range(total)]


def barrier() -> None:
    """Wait for every rank: through torch.distributed when initialised, else through a gloo group set up from
    the launcher's environment (``MASTER_ADDR``/``MASTER_PORT``) just for this; no-op with one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return
    rank, world = rank_world()
    if world <= 1:
        return
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--batch-file {str(path)!r}: no such file")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--batch-file {str(path)!r} holds no prompts (one per line; '#' starts a comment)")
    return prompts


def _batch_layout(out: str) -> tuple[Path, str]:
    """``--out video.mp4`` -> folder ``video/`` with ``0000.mp4``...; ``--out dir`` -> ``dir/0000.mp4``..."""
    path = Path(out)
    if path.suffix:
        return path.with_suffix(""), path.suffix
    return path, ".mp4"


def render_batch(
    request: Any, batch_file: str | Path, *, rank: int | None = None, world: int | None = None
) -> dict[str, Any]:
    """Render every prompt of ``batch_file`` with ``request``'s settings, split across the launched processes.

    Each rank renders its :func:`shard` (with several processes, on GPU ``LOCAL_RANK`` unless ``request.device``
    names another) and writes ``<out>/<index>.<suffix>`` plus ``<out>/<index>.json``; a failing item is recorded
    with its error instead of stopping the rank, so every rank reaches the barrier. Rank 0 then writes
    ``<out>/summary.json`` with all records in prompt order. Every item uses ``request.seed``, so a prompt renders
    the same whatever the split.
    Returns this rank's view: its records, and on rank 0 the summary path.
    """
    from .render import render

    prompts = read_prompts(batch_file)
    env_rank, env_world = rank_world()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    folder, suffix = _batch_layout(request.out)
    folder.mkdir(parents=True, exist_ok=True)
    device = request.device
    if world > 1 and torch.cuda.is_available() and device in (None, "cuda"):  # one GPU per process
        device = f"cuda:{local_rank()}"
    mine = shard(prompts, rank, world)
    for index, _ in mine:  # a record left by an earlier run must not stand in for one of this run
        (folder / f"{index:04d}.json").unlink(missing_ok=True)
    records = []
    for index, prompt in mine:
        item = replace(request, prompt=prompt, out=str(folder / f"{index:04d}{suffix}"), device=device)
        record: dict[str, Any] = {"index": index, "prompt": prompt, "rank": rank}
        start = time.perf_counter()
        try:
            result = render(item)
            record.update(
                out=result["out"],
                seconds=result["seconds"],
                method=result["method"],
                estimated_speedup=result["estimated_speedup"],
                overall=result["stats"]["overall"],
            )
        except Exception as exc:  # noqa: BLE001 - recorded, so the other ranks are not left waiting
            record.update(error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start)
        (folder / f"{index:04d}.json").write_text(json.dumps(record, indent=2, default=str))
        records.append(record)
    barrier()
    summary_path = None
    if rank == 0:
        files = [folder / f"{i:04d}.json" for i in range(len(prompts))]
        merged = merge_records([json.loads(f.read_text()) for f in files if f.exists()], len(prompts))
        summary = {
            "batch_file": str(batch_file),
            "world_size": world,
            "items": merged,
            "failed": [r["index"] for r in merged if "error" in r],
            "render_seconds_total": sum(r.get("seconds", 0.0) for r in merged),
        }
        summary_path = folder / "summary.json"
        summary_path.write_text(json.dumps(summary, indent=2, default=str))
    failed = sum("error" in r for r in records)
    message = f"rank {rank}/{world}: rendered {len(records) - failed} of {len(records)} prompt(s) into {folder}"
    message += f", {failed} failed (see their .json)" if failed else ""
    message += f"; summary of all {len(prompts)}: {summary_path}" if summary_path else ""
    return {
        "rank": rank,
        "world_size": world,
        "records": records,
        "failed": failed,
        "summary": str(summary_path) if summary_path else None,
        "message": message,
    }
