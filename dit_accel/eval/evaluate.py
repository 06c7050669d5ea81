"""``evaluate()``: each configuration against the dense video of the same prompt and seed.

The dense baseline runs once per (prompt, seed) through dit_accel's own machinery with method ``dense`` (the
output is bit-identical to the stock pipeline) so that its attention time is measured the same way as the
accelerated runs'. Records are plain JSON-serialisable dicts, which the sweep stores and the report reads.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import AccelConfig, resolve_config
from ..kernels import backend_for
from ..render import (
    FlopCounter,
    _device_of,
    apply_request,
    check_size,
    effective_density,
    estimate_speedup,
    frames_of,
    load_pipeline,
)
from .metrics import compare_videos
from .probe import AttentionProbe

__all__ = ["RunOutput", "evaluate", "config_key", "normalise_config", "run_once"]

ConfigSpec = Mapping[str, Any] | AccelConfig | str


def normalise_config(spec: ConfigSpec) -> dict[str, Any]:
    """``{"method": ..., **options}`` from a method name, a dict or an :class:`AccelConfig`."""
    if isinstance(spec, str):
        return {"method": spec}
    if isinstance(spec, AccelConfig):
        return spec.to_dict()
    out = dict(spec)
    if "method" not in out:
        raise ValueError(f"config {spec!r} has no 'method'")
    return out


def config_key(spec: ConfigSpec) -> str:
    """A stable string for a configuration (sorted JSON), used to match records across runs."""
    return json.dumps(normalise_config(spec), sort_keys=True, default=list)


@dataclass
class RunOutput:
    """One generation: decoded frames, final latents (when the pipeline exposes them), timings and stats."""

    frames: np.ndarray
    latents: torch.Tensor | None
    wall_s: float
    attention_s: float
    stats: dict[str, Any]
    probe: dict[str, Any]
    flop_share: float = 0.0  # self-attention's share of the transformer FLOPs of this run's shapes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _accepts_callback(pipe: Any) -> bool:
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return False
    return "callback_on_step_end" in params and "callback_on_step_end_tensor_inputs" in params


def run_once(
    pipe: Any,
    call_kwargs: Mapping[str, Any],
    seed: int,
    config: ConfigSpec,
    *,
    probe_steps: Iterable[int] | None = (),
    probe_layers: Iterable[int] | None = None,
) -> RunOutput:
    """Accelerate ``pipe`` with ``config``, generate once with ``seed``, and take everything off again.

    Wall time is measured between device synchronisations and excludes the probe's own dense recomputation.
    """
    import dit_accel

    spec = normalise_config(config)
    method = spec.pop("method")
    handle = dit_accel.accelerate(pipe, method, **spec)
    device = _device_of(pipe)
    kwargs = dict(call_kwargs)
    captured: dict[str, torch.Tensor] = {}
    if _accepts_callback(pipe):

        def keep_latents(_pipe: Any, _step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            captured["latents"] = tensors["latents"]
            return tensors

        kwargs["callback_on_step_end"] = keep_latents
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
    generator = torch.Generator().manual_seed(int(seed))
    accelerators = list(handle.accelerators.values())
    flops = FlopCounter(accelerators[0].transformer)
    accelerators[0].observers.append(flops)
    try:
        with AttentionProbe(handle, steps=probe_steps, layers=probe_layers) as probe:
            _sync(device)
            start = time.perf_counter()
            output = pipe(**kwargs, generator=generator)
            _sync(device)
            wall = time.perf_counter() - start - probe.probe_seconds
        stats = handle.stats()
    finally:
        accelerators[0].observers.remove(flops)
        handle.remove()
    latents = captured.get("latents")
    return RunOutput(
        frames=frames_of(output).astype(np.float32),
        latents=None if latents is None else latents.detach().float().cpu(),
        wall_s=wall,
        attention_s=probe.attention_seconds(),
        stats=stats,
        probe=probe.summary(),
        flop_share=flops.share(),
    )


class BaselineCache:
    """Dense runs per (prompt, seed, call settings), in memory and optionally as ``.npz`` files on disk so a
    resumed sweep does not recompute them."""

    def __init__(self, folder: str | Path | None = None, tag: str = "") -> None:
        self.folder = Path(folder) if folder is not None else None
        self.tag = tag
        self.runs: dict[str, RunOutput] = {}

    def key(self, call_kwargs: Mapping[str, Any], seed: int, tag: str = "") -> str:
        plain = {k: v for k, v in call_kwargs.items() if not isinstance(v, torch.Tensor)}
        tensors = {
            k: hashlib.sha1(v.detach().float().cpu().numpy().tobytes()).hexdigest()[:12]
            for k, v in call_kwargs.items()
            if isinstance(v, torch.Tensor)
        }
        text = json.dumps(
            {"tag": [self.tag, tag], "seed": seed, "plain": plain, "tensors": tensors}, sort_keys=True, default=str
        )
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def get(self, key: str) -> RunOutput | None:
        if key in self.runs:
            return self.runs[key]
        if self.folder is None:
            return None
        path = self.folder / f"baseline-{key}.npz"
        if not path.exists():
            return None
        data = np.load(path, allow_pickle=False)
        meta = json.loads(str(data["meta"]))
        latents = torch.from_numpy(data["latents"]) if data["latents"].size else None
        run = RunOutput(
            data["frames"], latents, meta["wall_s"], meta["attention_s"], meta["stats"], {}, meta.get("flop_share", 0.0)
        )
        self.runs[key] = run
        return run

    def put(self, key: str, run: RunOutput) -> None:
        self.runs[key] = run
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"wall_s": run.wall_s, "attention_s": run.attention_s, "stats": run.stats, "flop_share": run.flop_share}
        meta = json.dumps(meta)
        latents = run.latents.numpy() if run.latents is not None else np.zeros(0, dtype=np.float32)
        tmp = self.folder / f"baseline-{key}.tmp.npz"
        np.savez_compressed(tmp, frames=run.frames, latents=latents, meta=np.array(meta))
        tmp.replace(self.folder / f"baseline-{key}.npz")


def _is_paper(method: str) -> bool:
    return method.endswith("-paper")


def make_record(
    spec: Mapping[str, Any],
    seed: int,
    prompt: str | None,
    run: RunOutput,
    baseline: RunOutput,
    *,
    use_lpips: bool = True,
) -> dict[str, Any]:
    """Compare ``run`` with ``baseline`` and flatten everything a report needs into one dict."""
    spec = normalise_config(spec)
    options = {k: v for k, v in spec.items() if k != "method"}
    resolved = resolve_config(spec["method"], **options).to_dict()
    schedules = list(run.stats.get("schedules", {}).values())
    if schedules:  # what ran: a preset may set its schedule per model family
        resolved.update(schedules[0])
    overall = run.stats["overall"]
    density = effective_density(overall)
    share = baseline.attention_s / baseline.wall_s if baseline.wall_s > 0 else 0.0
    metrics = compare_videos(
        run.frames,
        baseline.frames,
        test_latents=run.latents,
        reference_latents=baseline.latents,
        use_lpips=use_lpips,
    )
    record: dict[str, Any] = {
        "key": config_key(spec),
        "method": spec["method"],
        "options": options,
        "config": resolved,
        "paper": _is_paper(spec["method"]),
        "seed": int(seed),
        "prompt": prompt,
        "wall_s": run.wall_s,
        "attention_s": run.attention_s,
        "baseline_wall_s": baseline.wall_s,
        "baseline_attention_s": baseline.attention_s,
        "attention_share": share,
        "speedup": baseline.wall_s / run.wall_s if run.wall_s > 0 else None,
        "attention_speedup": baseline.attention_s / run.attention_s if run.attention_s > 0 else None,
        "est_speedup": estimate_speedup(share, density),
        "attention_flop_share": baseline.flop_share,
        "est_speedup_flops": estimate_speedup(baseline.flop_share, density),
        "density": density,
        "block_density": overall.get("block_density"),
        "attention_work": overall.get("attention_work"),
        "sparse_calls": overall.get("sparse_calls", 0) + overall.get("refresh_calls", 0),
        "dense_calls": overall.get("dense_calls", 0),
        "dense_reasons": overall.get("dense_reasons", {}),
        "kernel_backend": run.stats.get("kernel_backend"),
        "attn_rel_error": run.probe.get("attn_rel_error"),
        "attn_rel_error_max": run.probe.get("attn_rel_error_max"),
        "probe": run.probe.get("per_step_layer", []),
    }
    record.update(metrics)
    return record


def evaluate(
    pipe: Any,
    configs: Sequence[ConfigSpec],
    *,
    seeds: Sequence[int] = (0,),
    prompts: Sequence[str | None] = (None,),
    call_kwargs: Mapping[str, Any] | None = None,
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    probe_steps: Iterable[int] | None = (-1,),
    probe_layers: Iterable[int] | None = None,
    use_lpips: bool = True,
    baselines: BaselineCache | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    skip: Callable[[str, int, str | None], bool] | None = None,
    keep_going: bool = False,
    warmup: bool = True,
    on_first_timing: Callable[[float, int], None] | None = None,
    on_frames: Callable[[dict[str, Any], np.ndarray], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the dense baseline once per (prompt, seed) and every configuration against it.

    Args:
        pipe: a diffusers pipeline, or a model name/directory for :func:`dit_accel.render.load_pipeline`.
        configs: method names, ``{"method": ..., **options}`` dicts or :class:`AccelConfig` objects.
        seeds, prompts: every combination is evaluated; a ``None`` prompt keeps the pipeline's own input
            (for the built-in tiny models, their fixed prompt embeddings).
        call_kwargs: pipeline call arguments (defaults: those :func:`load_pipeline` returns); ``output_type`` is
            always ``"np"``, the final latents are captured through ``callback_on_step_end`` when available.
        probe_steps, probe_layers: attention probe selection (see :class:`AttentionProbe`); ``()`` disables it.
        baselines: a cache to reuse dense runs across calls (the sweep persists it on disk).
        on_record: called with each record as soon as it exists (the sweep saves progressively).
        skip: ``skip(key, seed, prompt)`` returning True leaves that record out (already finished).
        warmup: one untimed single-step run before the first timed one.
        on_first_timing: called once with the seconds one denoising step took (the warm-up step, else the first
            dense render's mean) and the steps per render, so a caller can estimate the time of what follows.
        on_frames: called with each record (and once per baseline, with a ``{"method": "dense", ...}`` record)
            and its decoded frames (F, H, W, C), e.g. to keep a contact sheet.
        keep_going: record a failing configuration as ``{"error": ...}`` and continue instead of raising.

    Returns:
        One record per (config, prompt, seed): config, seed, wall time, attention time, density, speed-ups
        (measured and estimated) and quality metrics against the dense run.
    """
    if isinstance(pipe, str):
        pipe, defaults = load_pipeline(pipe)
        call_kwargs = {**defaults, **(call_kwargs or {})}
    base_kwargs = dict(call_kwargs or {})
    base_kwargs["output_type"] = "np"  # metrics need decoded frames; latents are captured separately
    baselines = baselines if baselines is not None else BaselineCache()
    specs = [normalise_config(c) for c in configs]
    records: list[dict[str, Any]] = []
    warmed = False
    for prompt in prompts:
        kwargs = apply_request(pipe, base_kwargs, prompt=prompt, steps=steps, frames=frames, height=height, width=width)
        check_size(pipe, kwargs)
        for seed in seeds:
            todo = [s for s in specs if skip is None or not skip(config_key(s), seed, prompt)]
            if not todo:
                continue
            n_steps = int(kwargs.get("num_inference_steps") or 1)
            bkey = baselines.key(kwargs, seed, type(pipe).__name__)
            baseline = baselines.get(bkey)
            if warmup and not warmed:
                # One untimed single-step run absorbs first-call costs (allocator, kernel compilation, caches)
                # that would otherwise inflate whichever run comes first.
                warmed = True
                start = time.perf_counter()
                try:
                    run_once(pipe, {**kwargs, "num_inference_steps": 1}, seed, todo[0], probe_steps=())
                except Exception:  # noqa: BLE001 - the timed run reports the failure properly
                    pass
                if on_first_timing is not None:
                    on_first_timing(time.perf_counter() - start, n_steps)
                    on_first_timing = None
            if baseline is None:
                baseline = run_once(pipe, kwargs, seed, "dense", probe_steps=())
                baselines.put(bkey, baseline)
                if on_first_timing is not None:
                    on_first_timing(baseline.wall_s / n_steps, n_steps)
                    on_first_timing = None
            if on_frames is not None:
                on_frames({"key": config_key({"method": "dense"}), "method": "dense", "seed": int(seed),
                           "prompt": prompt}, baseline.frames)  # fmt: skip
            for spec in todo:
                try:
                    run = run_once(pipe, kwargs, seed, spec, probe_steps=probe_steps, probe_layers=probe_layers)
                except Exception as exc:  # noqa: BLE001 - one failing configuration must not end a sweep
                    if not keep_going:
                        raise
                    options = {k: v for k, v in spec.items() if k != "method"}
                    record = {"key": config_key(spec), "method": spec["method"], "options": options}
                    record.update({"seed": int(seed), "prompt": prompt, "error": f"{type(exc).__name__}: {exc}"})
                else:
                    record = make_record(spec, seed, prompt, run, baseline, use_lpips=use_lpips)
                    record["kernel_backend"] = record["kernel_backend"] or backend_for(_device_of(pipe))
                    record["size"] = list(run.frames.shape[:3])  # what was rendered: frames, height, width
                    if on_frames is not None:
                        on_frames(record, run.frames)
                record["device"] = str(_device_of(pipe))
                record["steps"] = kwargs.get("num_inference_steps")
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records
