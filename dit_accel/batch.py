"""Many generations split across processes: batch renders (``dit-accel render --batch-file``) and sweeps.

Under ``torchrun`` or ``accelerate launch`` every process calls the same command; :func:`rank_world` says which
process this is, :func:`shard` gives it its share of the items (with their indices), each process writes its own
files, and rank 0 merges the per-item records back into item order (:func:`merge_records`). This module sits above
the core (it renders through :mod:`dit_accel.render`); the core never imports it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = ["barrier", "local_rank", "merge_records", "rank_world", "read_prompts", "render_batch", "shard"]

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: from torch.distributed when initialised, else accelerate's
    ``PartialState`` when set up, else the launcher's environment (``RANK``/``WORLD_SIZE`` from torchrun and
    accelerate launch), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:
            state = PartialState()
            return int(state.process_index), int(state.num_processes)
    except Exception:  # noqa: BLE001 - accelerate missing or not configured: fall back to the environment
        pass
    rank, world = int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} in the environment: need 0 <= RANK < WORLD_SIZE")
    return rank, world


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``), the GPU it should use."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def shard(items: Sequence[T], rank: int, world: int) -> list[tuple[int, T]]:
    """The (index, item) pairs process ``rank`` of ``world`` handles: a contiguous share, in order, sizes differing
    by at most one (neighbouring items often share work, e.g. a sweep's baseline per seed); the indices let
    :func:`merge_records` restore the original order."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank!r}, world={world!r}: need world >= 1 and 0 <= rank < world")
    n = len(items)
    lo, hi = rank * n // world, (rank + 1) * n // world
    return [(i, items[i]) for i in range(lo, hi)]


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
    """``--out video.mp4`` -> folder ``video/`` with ``0000.mp4``...; ``--out dir`` (no suffix, a trailing ``/`` or
    an existing folder, as in :func:`dit_accel.render.output_kind`) -> ``dir/0000.mp4``..."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or not path.suffix or path.is_dir():
        return path, ".mp4"
    return path.with_suffix(""), path.suffix


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
    from . import render as _render

    prompts = read_prompts(batch_file)
    if rank is None or world is None:
        env_rank, env_world = rank_world()
        rank, world = env_rank if rank is None else rank, env_world if world is None else world
    folder, suffix = _batch_layout(request.out)
    _render.prepare_folder(folder)
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
            result = _render.render(item)
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
