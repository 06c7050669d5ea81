"""The ``dit-accel`` command line: info and render (sweep and bench come from their own modules)."""

from __future__ import annotations

import json
import platform
from typing import Any

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
    import diffusers
    import torch

    import dit_accel
    from dit_accel.kernels import backend_for
    from dit_accel.pipelines import FAMILIES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    typer.echo(f"dit_accel {dit_accel.__version__}")
    typer.echo(f"methods: {', '.join(dit_accel.METHODS)} (default: {dit_accel.DEFAULT_METHOD})")
    for fam in FAMILIES:
        typer.echo(f"  {fam.name:14s} {', '.join(fam.classes)}")
    typer.echo(f"kernel backend on {device}: {backend_for(device)}")
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        triton_version = "not available"
    typer.echo(
        f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"triton {triton_version}"
    )


@app.command()
def render(
    out: str = typer.Option("video.mp4", "--out", "-o", help="Output .mp4, .gif, or a folder for PNG frames."),
    model: str = typer.Option(None, help="Model directory, or a built-in name such as tiny-wan. Default: shipped."),
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
) -> None:
    """Render a video offline with an accelerated pipeline."""
    from dit_accel.render import RenderRequest, default_model
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
    )
    try:
        result = run_render(request)
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None
    overall = result["stats"]["overall"]
    density = overall["block_density"]
    typer.echo(
        f"wrote {result['out']} in {result['seconds']:.1f} s with method {result['method']}: "
        f"{overall['sparse_calls']} sparse / {overall['dense_calls']} dense attention calls"
        + (f", block density {density:.3f}" if density is not None else "")
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
