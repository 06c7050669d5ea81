"""Quality-vs-speed sweep: methods x sparsity (x schedule options) x seeds, resumable and shardable.

``DIR/results.json`` is rewritten after every record, so an interrupted sweep resumes where it stopped
(finished records are kept and skipped). Under ``accelerate launch`` / ``torchrun`` every process takes a
contiguous share of the remaining records (grouped by seed, so each process computes few baselines), writes
``DIR/parts/rank{r}.json``, and rank 0 merges the parts and writes the report once all are done.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import config as _config
from ..batch import rank_world, shard
from .evaluate import BaselineCache, config_key, evaluate

__all__ = [
    "SweepSpec",
    "build_grid",
    "load_results",
    "merge_parts",
    "record_id",
    "run_sweep",
    "save_strip",
    "strip_name",
    "time_estimate",
]

RESULTS = "results.json"
PARTS = "parts"
ESTIMATE_ABOVE_S = 180.0  # sweeps estimated longer than this print their estimate before they start


@dataclass
class SweepSpec:
    """What to sweep. ``methods=None`` means every entry of ``dit_accel.METHODS`` at the time of the call.

    Attributes:
        schedule: extra grid axes, option name -> values (e.g. ``{"dense_steps": [0, 0.25]}``).
        options: fixed options added to every configuration (e.g. ``{"min_tokens": 0}``).
        paper_at_defaults: presets whose name ends in ``-paper`` keep their published settings (sparsity and
            schedule axes are not applied to them), so they appear as single reference points.
    """

    model: str = "tiny-wan"
    methods: Sequence[str] | None = None
    sparsity: Sequence[float] = (0.8, 0.9, 0.95)
    seeds: Sequence[int] = (0,)
    prompts: Sequence[str | None] = (None,)
    steps: int | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    schedule: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    probe_steps: Sequence[int] | None = (-1,)
    probe_layers: Sequence[int] | None = None
    lpips: bool = True
    paper_at_defaults: bool = True
    warmup: bool = True
    device: str | None = None  # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    dtype: str | None = None

    def resolved_methods(self) -> list[str]:
        methods = list(_config.METHODS) if not self.methods else list(self.methods)
        unknown = [m for m in methods if m not in _config.PRESETS]
        if unknown:
            raise ValueError(
                f"--methods: unknown {', '.join(map(repr, unknown))}; available: {', '.join(_config.METHODS)}"
            )
        return methods

    def validate(self) -> None:
        """Refuse settings that cannot run (zero steps, a negative size, a device this machine lacks) before
        anything is written or loaded; messages name the command-line flag."""
        from ..render import _check_int, check_device

        for flag, value in (
            ("--steps", self.steps),
            ("--frames", self.frames),
            ("--height", self.height),
            ("--width", self.width),
        ):
            _check_int(flag, value)
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"--seeds {seed!r}: seeds are integers")
        check_device(self.device)
        self.resolved_methods()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["methods"] = self.resolved_methods()
        return out


def build_grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every configuration of the sweep, validated (a bad option fails here, before any rendering)."""
    axes = list(spec.schedule.items())
    configs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for method in spec.resolved_methods():
        fixed = dict(spec.options)
        if method == "dense" or (spec.paper_at_defaults and method.endswith("-paper")):
            variants = [{}]
        else:
            names = [name for name, _ in axes]
            variants = [
                {"sparsity": float(s), **dict(zip(names, values))}
                for s in spec.sparsity
                for values in itertools.product(*(vals for _, vals in axes))
            ]
        for variant in variants:
            cfg = {"method": method, **fixed, **variant}
            options = {k: v for k, v in cfg.items() if k != "method"}
            _config.resolve_config(method, **options)
            key = config_key(cfg)
            if key not in seen:
                seen.add(key)
                configs.append(cfg)
    return configs


def record_id(key: str, seed: int, prompt: str | None) -> str:
    """Identity of one record: configuration, seed and prompt."""
    return json.dumps([key, int(seed), prompt])


FRAMES = "frames"


def strip_name(key: str, seed: int, prompt: str | None) -> str:
    """File name (under ``DIR/frames``) of one record's frame strip: readable method prefix plus a hash."""
    method = json.loads(key).get("method", "run") if key.startswith("{") else "run"
    digest = hashlib.sha1(record_id(key, seed, prompt).encode()).hexdigest()[:10]
    return f"{method}-{digest}.png"


def save_strip(folder: Path, record: dict[str, Any], frames: Any) -> Path:
    """The first, middle and last frame side by side as one PNG (the report's contact sheet reads them)."""
    import imageio.v3 as iio
    import numpy as np

    frames = np.asarray(frames)
    picks = sorted({0, len(frames) // 2, len(frames) - 1})
    strip = np.concatenate([frames[i] for i in picks], axis=1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / strip_name(record["key"], record["seed"], record.get("prompt"))
    iio.imwrite(path, (np.clip(strip, 0.0, 1.0) * 255).round().astype(np.uint8))
    return path


def time_estimate(step_seconds: float, steps: int, renders: int) -> float:
    """Seconds for ``renders`` renders of ``steps`` steps when one step takes ``step_seconds``."""
    return step_seconds * steps * renders


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def load_results(out: Path) -> dict[str, Any]:
    """The results file, or an empty one."""
    path = out / RESULTS
    if path.exists():
        return json.loads(path.read_text())
    return {"spec": None, "records": [], "baselines": {}}


def _part_paths(out: Path) -> list[Path]:
    folder = out / PARTS
    return sorted(folder.glob("rank*.json")) if folder.exists() else []


def merge_parts(out: Path, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fold every process's part file into ``results.json`` (later records win), then delete the parts."""
    results = load_results(out)
    by_id = {record_id(r["key"], r["seed"], r.get("prompt")): r for r in results["records"]}
    parts = _part_paths(out)
    for part in parts:
        for record in json.loads(part.read_text()).get("records", []):
            by_id[record_id(record["key"], record["seed"], record.get("prompt"))] = record
    results["records"] = list(by_id.values())
    if spec is not None:
        results["spec"] = spec
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / RESULTS, json.dumps(results, indent=1, default=str))
    for part in parts:
        part.unlink()
    if (out / PARTS).exists():
        for marker in (out / PARTS).glob("done.*"):
            marker.unlink()
        if not any((out / PARTS).iterdir()):
            (out / PARTS).rmdir()
    return results


def _finished(out: Path) -> set[str]:
    """Records already done: in results.json and in parts left by an interrupted multi-process run."""
    records = list(load_results(out)["records"])
    for part in _part_paths(out):
        try:
            records += json.loads(part.read_text()).get("records", [])
        except json.JSONDecodeError:
            continue
    return {record_id(r["key"], r["seed"], r.get("prompt")) for r in records if "error" not in r}


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    rank: int | None = None,
    world: int | None = None,
    progress: bool = True,
    wait_timeout_s: float = 24 * 3600.0,
    report: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a sweep into ``out``; returns ``{"done", "skipped", "records", "files"}``.

    Every process calls this with the same arguments; ``rank``/``world`` default to
    :func:`dit_accel.batch.rank_world`.
    """
    from tqdm.auto import tqdm

    from ..render import prepare_folder

    spec.validate()
    configs = build_grid(spec)  # a bad option fails here, before the folder is made
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PermissionError(f"--out {str(out)!r} is a file; a sweep writes a folder (results.json, report.md, ...)")
    prepare_folder(out)
    if rank is None or world is None:
        rank, world = rank_world()
    finished = _finished(out)
    pairs = [(p, s) for p in spec.prompts for s in spec.seeds]
    todo = [
        (cfg, prompt, seed)
        for prompt, seed in pairs
        for cfg in configs
        if record_id(config_key(cfg), seed, prompt) not in finished
    ]
    total = len(configs) * len(pairs)
    mine = [item for _, item in shard(todo, rank, world)]
    spec_dict = spec.to_dict()

    part_records: list[dict[str, Any]] = []
    part_path = out / PARTS / f"rank{rank}.json"
    if world > 1:
        part_path.parent.mkdir(parents=True, exist_ok=True)
        (out / PARTS / f"done.rank{rank}").unlink(missing_ok=True)

    results = load_results(out)
    if world == 1:
        results["spec"] = spec_dict

    def save(record: dict[str, Any]) -> None:
        if world > 1:
            part_records.append(record)
            _atomic_write(part_path, json.dumps({"records": part_records}, default=str))
        else:
            rid = record_id(record["key"], record["seed"], record.get("prompt"))
            results["records"] = [
                r for r in results["records"] if record_id(r["key"], r["seed"], r.get("prompt")) != rid
            ] + [record]
            _atomic_write(out / RESULTS, json.dumps(results, indent=1, default=str))
        bar.update(1)

    bar = tqdm(total=len(mine), desc=f"sweep[{rank}/{world}]" if world > 1 else "sweep", disable=not progress)
    if mine:
        from ..render import load_pipeline

        pipe, defaults = load_pipeline(spec.model, device=spec.device, dtype=spec.dtype)
        baselines = BaselineCache(out / "baselines", tag=spec.model)
        mine_ids = {record_id(config_key(c), s, p) for c, p, s in mine}
        groups: dict[tuple[str | None, int], list[dict[str, Any]]] = {}
        for cfg, prompt, seed in mine:
            groups.setdefault((prompt, seed), []).append(cfg)
        renders = len(mine) + len(groups)  # every configuration, and a dense baseline per (prompt, seed) at most

        announced: list[float] = []

        def announce(step_seconds: float, steps: int) -> None:  # once, from the first timing of the sweep
            seconds = time_estimate(step_seconds, steps, renders)
            if not announced and seconds >= ESTIMATE_ABOVE_S:
                bar.write(
                    f"sweep: {renders} renders of {steps} steps, about {seconds / 60:.0f} min here "
                    f"(one step took {step_seconds:.1f} s; resumable: rerun the same command)"
                )
            announced.append(seconds)

        for index, ((prompt, seed), cfgs) in enumerate(groups.items()):
            evaluate(
                pipe,
                cfgs,
                seeds=[seed],
                prompts=[prompt],
                call_kwargs=defaults,
                steps=spec.steps,
                frames=spec.frames,
                height=spec.height,
                width=spec.width,
                probe_steps=spec.probe_steps,
                probe_layers=spec.probe_layers,
                use_lpips=spec.lpips,
                baselines=baselines,
                on_record=save,
                skip=lambda key, s, p: record_id(key, s, p) not in mine_ids,
                keep_going=True,
                warmup=spec.warmup and index == 0,
                on_first_timing=announce,
                on_frames=lambda record, frames: save_strip(out / FRAMES, record, frames),
            )
    bar.close()

    files: dict[str, str] = {}
    if world > 1:
        (out / PARTS / f"done.rank{rank}").write_text(str(len(mine)))
        if rank != 0:
            return {"done": len(mine), "skipped": total - len(todo), "records": part_records, "files": files}
        deadline = time.monotonic() + wait_timeout_s
        while not all((out / PARTS / f"done.rank{r}").exists() for r in range(world)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"sweep: ranks did not finish within {wait_timeout_s:.0f} s; rerun to resume")
            time.sleep(0.5)
        results = merge_parts(out, spec_dict)
    files["results"] = str(out / RESULTS)
    if report:
        from .report import write_report

        files.update(write_report(results["records"], out, spec=spec_dict))
    return {"done": len(mine), "skipped": total - len(todo), "records": results["records"], "files": files}
