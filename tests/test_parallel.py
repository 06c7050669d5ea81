"""dit_accel under diffusers context parallelism (Ulysses), and prompts split across processes.

``test_ulysses_two_processes_match_one_process`` runs diffusers' real Ulysses context parallelism in two CPU
processes over gloo (gloo implements the ``all_to_all_single`` Ulysses needs; the only CPU workaround is
``_one_device_on_cpu`` around ``enable_parallelism``), so no simulation of the
head split is needed. It checks that each rank's sites see the full sequence for half of the heads, that sparse
calls really ran, and that the output equals the one-process run of the same method to ``atol=1e-5`` (fp32 on
CPU; observed bit-identical), including an adaptive-refresh configuration whose decisions mix heads.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import ContextParallelConfig
from diffusers.models._modeling_parallel import ParallelConfig

import dit_accel
from dit_accel import batch, parallel
from dit_accel.parallel import head_sum_count
from dit_accel.testing import tiny_pipeline

WORLD = 2
# Between the adaptive-refresh drifts of the tiny Wan's two sites (about 0.031 and 0.041 nats at step 1), so
# some calls refresh adaptively and some do not.
DRIFT = 0.036


def _one_device_on_cpu() -> contextlib.AbstractContextManager:
    """diffusers 0.42.1's ``enable_parallelism`` picks ``rank % torch.accelerator.device_count()``: 0 on CPU."""
    if torch.accelerator.device_count() > 0:
        return contextlib.nullcontext()
    return mock.patch.object(torch.accelerator, "device_count", return_value=1)


def test_head_sum_count_without_a_group_is_this_ranks_sum_and_count() -> None:
    values = torch.tensor([0.5, 1.0, 3.0])
    assert head_sum_count(values.sum(), torch.tensor(3)).tolist() == [4.5, 3.0]


# -- refusals (a parallel config attached by hand: no process group needed) -----------------------------------


@pytest.mark.parametrize(
    ("cp", "mode"),
    [
        (ContextParallelConfig(ring_degree=2), "ring"),
        (ContextParallelConfig(ring_degree=2, ulysses_degree=2), "unified"),
    ],
)
def test_ring_and_unified_are_refused_at_accelerate(cp: ContextParallelConfig, mode: str) -> None:
    pipe, _ = tiny_pipeline("wan")
    pipe.transformer._parallel_config = ParallelConfig(context_parallel_config=cp)
    with pytest.raises(ValueError, match=rf"{mode}.*Ulysses mode only.*ulysses_degree=\d"):
        dit_accel.accelerate(pipe, "blocktopk")
    assert not hasattr(pipe.transformer, "_dit_accel_accelerator")  # nothing was installed


def test_ring_enabled_after_accelerate_is_refused_at_forward() -> None:
    pipe, kwargs = tiny_pipeline("wan")
    kwargs["num_inference_steps"] = 1
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    pipe.transformer._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    with pytest.raises(ValueError, match="ring mode"):
        pipe(**kwargs)
    handle.remove()


def test_non_native_backend_is_refused_under_ulysses() -> None:
    pipe, _ = tiny_pipeline("wan")
    cp = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    pipe.transformer._parallel_config = cp
    assert parallel.check_context_parallel(pipe.transformer) is cp.context_parallel_config  # native: accepted
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    try:
        pipe.transformer.set_attention_backend("_native_cudnn")  # also sets diffusers' global active backend
        with pytest.raises(ValueError, match="'_native_cudnn'.*set_attention_backend\\('native'\\)"):
            dit_accel.accelerate(pipe, "blocktopk")
    finally:
        _AttentionBackendRegistry.set_active_backend(active)


# -- two real processes ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(pipe: Any, kwargs: dict[str, Any], method: str, options: dict[str, Any]) -> tuple[torch.Tensor, dict, set]:
    """Output, stats and the (q shape, kind) pairs the sites saw, for one accelerated generation."""
    handle = dit_accel.accelerate(pipe, method, min_tokens=64, **options)
    seen: set[tuple[tuple[int, ...], str]] = set()
    for acc in handle._accelerators.values():
        acc.observers.append(lambda event: seen.add((tuple(event.q.shape), event.kind)))
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    stats = handle.stats()
    handle.remove()
    return out, stats, seen


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _check_rank(rank, Path(folder))
    finally:
        dist.destroy_process_group()


def _check_rank(rank: int, folder: Path) -> None:
    # dense_steps=0: at 3 steps a 10 % warm-up is one dense step, leaving too few sparse calls to drift
    for method, options in (("rettention", {"refresh_drift": DRIFT, "dense_steps": 0}), ("sla", {"dense_steps": 0})):
        single, kwargs = tiny_pipeline("wan")
        split, _ = tiny_pipeline("wan")
        with _one_device_on_cpu():
            split.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        ref, ref_stats, ref_seen = _run(single, kwargs, method, options)
        out, stats, seen = _run(split, kwargs, method, options)
        heads = single.transformer.config.num_attention_heads
        # each rank's sites saw the whole sequence for its half of the heads, and really ran sparse
        assert {shape for shape, _ in ref_seen} == {(1, heads, 768, 16)}, ref_seen
        assert {shape for shape, _ in seen} == {(1, heads // WORLD, 768, 16)}, seen
        overall, ref_overall = stats["overall"], ref_stats["overall"]
        assert overall["sparse_calls"] > 0
        for key in ("sparse_calls", "refresh_calls", "adaptive_refreshes", "dense_calls"):
            assert overall[key] == ref_overall[key], (method, key, overall, ref_overall)
        if method == "rettention":
            assert 0 < overall["adaptive_refreshes"] < overall["refresh_calls"] + overall["sparse_calls"]
        assert stats["context_parallel"]["rank"] == rank and stats["context_parallel"]["ulysses_degree"] == WORLD
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # the mean that decides adaptive refreshes is taken over every rank's heads
    parallel.enter_forward(split.transformer)
    values = torch.full((rank + 1,), float(rank + 1))
    total, count = head_sum_count(values.sum(), torch.tensor(values.numel())).tolist()
    assert total / count == pytest.approx(5.0 / 3.0)  # (1 + 2 + 2) / 3
    # ring on a real process mesh is refused when accelerate() is called
    ring, _ = tiny_pipeline("wan")
    with _one_device_on_cpu():
        ring.transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=WORLD))
    with pytest.raises(ValueError, match="ring mode"):
        dit_accel.accelerate(ring, "blocktopk")
    # the batch split: a stand-in renderer (the real one is covered by the CLI test below)
    import dit_accel.render as render_module

    def fake_render(request: Any) -> dict[str, Any]:
        Path(request.out).write_text(request.prompt)
        overall = {"sparse_calls": rank}
        return {
            "out": request.out,
            "seconds": 0.0,
            "method": "x",
            "estimated_speedup": None,
            "stats": {"overall": overall},
        }

    render_module.render = fake_render
    prompts = folder / "prompts.txt"
    if rank == 0:
        prompts.write_text("a\nb\n# skipped\nc\n")
    dist.barrier()
    result = batch.render_batch(render_module.RenderRequest(out=str(folder / "out.txt")), prompts)
    assert [r["index"] for r in result["records"]] == ([0] if rank == 0 else [1, 2])  # contiguous shares


@pytest.mark.slow
def test_ulysses_two_processes_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["index"], r["prompt"], r["rank"]) for r in summary["items"]] == [(0, "a", 0), (1, "b", 1), (2, "c", 1)]
    assert summary["world_size"] == WORLD and summary["failed"] == []
    assert (tmp_path / "out" / "0001.txt").read_text() == "b"


# -- the command line -----------------------------------------------------------------------------------------


def test_cli_batch_file_renders_every_prompt(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dit_accel.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "videos.gif"
    args = ["render", "--model", "tiny-wan", "--batch-file", str(prompts), "--out", str(out), "--steps", "1"]
    size = ["--height", "64", "--width", "64", "--frames", "1"]  # the VAE decode dominates: keep it small
    pinned = ["--method", "blocktopk", "--no-progress", "--option", "min_tokens=16"]  # one step: no refresh
    result = CliRunner().invoke(app, [*args, *size, *pinned])
    assert result.exit_code == 0, result.output
    assert "rendered 2 of 2" in result.output
    summary = json.loads((tmp_path / "videos" / "summary.json").read_text())
    assert [r["prompt"] for r in summary["items"]] == ["a cat", "a dog"]
    assert all(r["overall"]["sparse_calls"] > 0 for r in summary["items"])
    assert all((tmp_path / "videos" / f"000{i}.gif").stat().st_size > 0 for i in range(2))
    missing = CliRunner().invoke(app, ["render", "--model", "tiny-wan", "--batch-file", str(tmp_path / "none.txt")])
    assert missing.exit_code == 2 and "--batch-file" in missing.output
