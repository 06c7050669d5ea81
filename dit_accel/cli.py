"""The ``dit-accel`` command line: info, render and sweep."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Step-aware sparse attention for DiT pipelines.")


def _parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise typer.BadParameter(f"--option {text!r} must look like name=value")
    name, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip(), value


@app.command()
def info() -> None:
    """Methods, supported pipelines, kernel backend and versions."""
    # Only what the lines below need: no diffusers, no dit_accel.api/runtime, no model (tests/test_cli.py checks).
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import dit_accel
    from dit_accel.kernels import auto_candidates, backend_for, requested
    from dit_accel.pipelines.families import FAMILIES

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    device = "cuda" if torch.cuda.is_available() else "cpu"
    typer.echo(f"dit_accel {dit_accel.__version__}")
    typer.echo(f"methods: {', '.join(dit_accel.METHODS)} (default: {dit_accel.DEFAULT_METHOD})")
    for fam in FAMILIES:
        typer.echo(f"  {fam.name:14s} {', '.join(fam.classes)}")
    timed = ", ".join((*auto_candidates("block_sparse_attention", device), "reference"))
    if requested() not in ("auto", "default"):
        typer.echo(f"kernel backend on {device}: {backend_for(device)} (DIT_ACCEL_KERNELS={requested()})")
    else:
        typer.echo(
            f"kernel backend on {device}: auto (kernel_backend default: times {timed} on the first call per shape "
            f"and density bucket, see handle.stats()['kernel_choices']); untimed calls: {backend_for(device)}"
        )
    typer.echo(
        f"python {platform.python_version()}, torch {torch.__version__}, diffusers {installed('diffusers')}, "
        f"triton {installed('triton')}"
    )


def _parse_list(text: str | None, cast: Callable[[str], Any], flag: str) -> list[Any] | None:
    if text is None or text.strip() == "":
        return None
    try:
        return [cast(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} must be a comma-separated list", param_hint=flag) from None


def _parse_schedule(items: list[str]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"{item!r} must look like name=v1,v2", param_hint="--schedule")
        name, raw = item.split("=", 1)
        values = []
        for part in raw.split(","):
            try:
                values.append(json.loads(part))
            except json.JSONDecodeError:
                values.append(part)
        out[name.strip()] = values
    return out


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=code)


@contextmanager
def _user_warnings() -> Iterator[None]:
    """Show the warnings meant for the user (words the toy model does not know) as one ``warning:`` line on
    stderr, each once; other warnings keep Python's own display."""
    import warnings

    from dit_accel.toy.text import ToyVocabularyWarning

    with warnings.catch_warnings():
        warnings.simplefilter("once", ToyVocabularyWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' API
            if issubclass(category, ToyVocabularyWarning):
                typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


@app.command()
def render(
    out: str = typer.Option("video.mp4", "--out", "-o", help="Output .mp4, .gif, or a folder for PNG frames."),
    model: str = typer.Option(
        None,
        help="Model directory, a diffusers id in the local HF cache, or a built-in name (tiny-wan). "
        "Default: the shipped toy model.",
    ),
    prompt: str = typer.Option("", help="Text prompt (models with a text encoder)."),
    negative_prompt: str = typer.Option("", help="Negative prompt."),
    method: str = typer.Option(None, help="Method from `dit-accel info`; default: the project's best preset."),
    sparsity: float = typer.Option(None, help="Fraction of key blocks skipped, in [0, 1)."),
    option: list[str] = typer.Option([], "--option", help="Any method option as name=value (repeatable)."),
    steps: int = typer.Option(None, help="Denoising steps."),
    frames: int = typer.Option(None, help="Number of frames."),
    height: int = typer.Option(None, help="Height in pixels."),
    width: int = typer.Option(None, help="Width in pixels."),
    seed: int = typer.Option(0, help="Random seed."),
    fps: int = typer.Option(8, help="Frames per second of the written video."),
    guidance_scale: float = typer.Option(None, help="Classifier-free guidance scale."),
    base_height: int = typer.Option(
        None, "--base-height", help="FreeSwim (Wan, toy): the training height; a larger --height renders with FreeSwim."
    ),
    base_width: int = typer.Option(
        None, "--base-width", help="FreeSwim (Wan, toy): the training width; a larger --width renders with FreeSwim."
    ),
    strength: float = typer.Option(None, help="FreeSwim: fraction of the steps the refinement runs (0.7)."),
    cache_every: int = typer.Option(None, "--cache-every", help="FreeSwim: a full-branch guide step every k (2)."),
    device: str = typer.Option(None, help="torch device, e.g. cuda or cpu; default: cuda when available."),
    dtype: str = typer.Option(None, help="Weights dtype: float32, float16 or bfloat16."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the denoising progress bar."),
    compare_dense: bool = typer.Option(
        False, "--compare-dense", help="Also render dense (same seed): prints the measured speed-up and PSNR."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the full summary (with per-site stats) as JSON."),
    batch_file: str = typer.Option(
        None,
        "--batch-file",
        help="Render every prompt of this file (one per line) into the --out folder; under accelerate launch or "
        "torchrun the prompts are split across the processes and rank 0 writes summary.json.",
    ),
) -> None:
    """Render a video offline with an accelerated pipeline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dit_accel.render import ModelNotFoundError, RenderRequest, default_model, validate_request
    from dit_accel.render import render as run_render

    options = dict(_parse_option(o) for o in option)
    if sparsity is not None:
        options["sparsity"] = sparsity
    request = RenderRequest(
        model=model or default_model(),
        prompt=prompt,
        negative_prompt=negative_prompt,
        method=method,
        options=options,
        steps=steps,
        frames=frames,
        height=height,
        width=width,
        seed=seed,
        fps=fps,
        guidance_scale=guidance_scale,
        out=out,
        device=device,
        dtype=dtype,
        progress=progress,
        base_height=base_height,
        base_width=base_width,
        freeswim={"strength": strength, "cache_every": cache_every},
        compare_dense=compare_dense,
    )
    try:  # before anything is loaded or written (every batch item would fail the same way)
        validate_request(request)
    except ValueError as exc:
        _fail(str(exc))
    if batch_file is not None:  # split across processes: dit_accel.batch.render_batch
        from dit_accel.batch import render_batch

        try:
            with _user_warnings():
                batch = render_batch(request, batch_file)
        except (ValueError, FileNotFoundError, PermissionError) as exc:
            _fail(str(exc))
        typer.echo(batch["message"])
        raise typer.Exit(code=1 if batch["failed"] else 0)
    try:
        with _user_warnings():
            result = run_render(request)
    except ModelNotFoundError as exc:
        _fail(str(exc))
    except PermissionError as exc:
        _fail(str(exc))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"--out {out!r}: could not write ({exc})")
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    overall = result["stats"]["overall"]
    typer.echo(
        f"wrote {result['out']} ({result['frames']} frames) in {result['seconds']:.1f} s with method "
        f"{result['method']} [{result['stats']['kernel_backend']} kernels]"
    )
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(overall["dense_reasons"].items())) or "none"
    density = overall["block_density"]
    swim = result.get("freeswim")
    typer.echo(
        f"attention calls{' (base pass)' if swim else ''}: {overall['sparse_calls']} sparse, "
        f"{overall['refresh_calls']} refresh, {overall['dense_calls']} dense (dense because: {reasons})"
        + (f"; kept block density {density:.3f}" if density is not None else "")
    )
    for line in freeswim_lines(swim) if swim else ():
        typer.echo(line)
    if result.get("measured_speedup") is not None:
        typer.echo(
            f"measured on {result['device']}: dense {result['dense_seconds']:.1f} s, accelerated "
            f"{result['seconds']:.1f} s: {result['measured_speedup']:.2f}x (same seed; PSNR against dense "
            f"{result['psnr_vs_dense']:.1f} dB)"
        )
    est = result["estimated_speedup"]
    if est is not None:
        typer.echo(
            f"FLOP estimate (not a measurement; it holds where the sparse kernels run at their kept density, as "
            f"the Triton kernels on a GPU): ~{est:.2f}x over dense attention, as self-attention is "
            f"~{100 * result['attention_flop_share']:.0f}% of the transformer's FLOPs here and "
            f"{100 * result['effective_density']:.0f}% of its work remains (VAE and text encoder excluded)"
            + ("" if "measured_speedup" in result else "; --compare-dense measures it on this device")
            + ("; FreeSwim: the base pass only" if swim else "")
        )


def _dims(values: Any) -> str:
    return " x ".join(str(v) for v in values)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def freeswim_lines(stats: dict[str, Any]) -> list[str]:
    """The plain-text summary of a FreeSwim refinement (``FreeSwimPipeline.last_stats``): what each branch ran and
    what the cross-attention cache saved, so a render above the training size says how FreeSwim worked."""
    guides = ", ".join(str(s) for s in stats.get("guide_steps", [])) or "none"
    lines = [
        f"FreeSwim: {_dims(stats['size'])} from a {_dims(stats['base_size'])} base; refinement {stats['steps']} "
        f"steps (strength {stats['strength']}), guide steps {guides} (cache every {stats['cache_every']})"
    ]
    density = stats.get("window_block_density")
    dense = ", ".join(f"{k} {v}" for k, v in sorted(stats.get("window_dense_calls", {}).items())) or "none"
    parts = [f"window {_dims(stats['window'])} of grid {_dims(stats['grid'])} tokens"] if "grid" in stats else []
    parts += [f"kept block density {density:.3f}"] if density is not None else []
    detail = f" ({', '.join(parts)})" if parts else ""
    lines.append(
        f"FreeSwim window branch: {_count(stats['window_forwards'], 'forward')}, {stats['window_calls']} windowed "
        f"self-attention calls{detail}; dense calls: {dense}"
    )
    lines.append(
        f"FreeSwim full branch: {_count(stats['full_forwards'], 'forward')}, "
        f"{stats['full_self_attention_calls']} dense self-attention calls"
    )
    where = "offloaded to the CPU" if stats.get("cache_device") == "cpu" else "on the model's device"
    dtype = "model dtype" if stats.get("cache_dtype") == "auto" else stats.get("cache_dtype")
    lines.append(
        f"FreeSwim cross-attention cache: {stats['attn2_computed']} computed by the full branch, "
        f"{stats['attn2_reused']} reused by the window branch, {stats['attn2_plain']} computed by the "
        f"unconditional pass; peak {stats['cache_bytes_peak'] / 2**20:.2f} MiB ({dtype}, {where})"
    )
    return lines


@app.command()
def sweep(
    out: str = typer.Option(..., "--out", "-o", help="Folder for results.json, report.md and pareto.png."),
    model: str = typer.Option(None, help="Model directory, cached diffusers id or built-in name (tiny-wan)."),
    methods: str = typer.Option(None, help="Comma-separated methods; default: every method in `dit-accel info`."),
    sparsity: str = typer.Option("0.8,0.9,0.95", help="Comma-separated sparsities."),
    steps: int = typer.Option(None, help="Denoising steps."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    prompt: list[str] = typer.Option([], "--prompt", help="Prompt (repeatable); default: the model's own input."),
    frames: int = typer.Option(None, help="Number of frames."),
    height: int = typer.Option(None, help="Height in pixels."),
    width: int = typer.Option(None, help="Width in pixels."),
    option: list[str] = typer.Option([], "--option", help="Fixed option for every configuration, name=value."),
    schedule: list[str] = typer.Option(
        [], "--schedule", help="Extra grid axis name=v1,v2 (repeatable), e.g. dense_steps=0,0.25."
    ),
    probe_steps: str = typer.Option("-1", help="Steps the attention probe checks (-1 = last; empty = none)."),
    probe_layers: str = typer.Option(None, help="Layers the attention probe checks; default: all."),
    lpips: bool = typer.Option(True, "--lpips/--no-lpips", help="LPIPS when its weights are cached locally."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="One untimed step before timing."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    device: str = typer.Option(None, help="torch device; default: cuda:LOCAL_RANK when available, else cpu."),
    dtype: str = typer.Option(None, help="Weights dtype: float32, float16 or bfloat16."),
) -> None:
    """Quality-vs-speed sweep over methods x sparsity (x schedule options) x seeds; resumable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dit_accel.eval.sweep import SweepSpec, run_sweep
    from dit_accel.render import ModelNotFoundError, default_model

    spec = SweepSpec(
        model=model or default_model(),
        methods=_parse_list(methods, str, "--methods"),
        sparsity=_parse_list(sparsity, float, "--sparsity") or [],
        seeds=_parse_list(seeds, int, "--seeds") or [0],
        prompts=list(prompt) or [None],
        steps=steps,
        frames=frames,
        height=height,
        width=width,
        schedule=_parse_schedule(schedule),
        options=dict(_parse_option(o) for o in option),
        probe_steps=_parse_list(probe_steps, int, "--probe-steps") or (),
        probe_layers=_parse_list(probe_layers, int, "--probe-layers"),
        lpips=lpips,
        warmup=warmup,
        device=device,
        dtype=dtype,
    )
    try:
        result = run_sweep(spec, out, progress=progress)
    except ModelNotFoundError as exc:
        _fail(str(exc))
    except (ValueError, TypeError, PermissionError) as exc:
        _fail(str(exc))
    files = result["files"]
    typer.echo(f"{result['done']} new records, {result['skipped']} already done")
    for name, path in files.items():
        typer.echo(f"{name}: {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
