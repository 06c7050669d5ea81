"""Evidence that the toy model learned: prompt fidelity, temporal coherence and attention structure.

On held-out prompts ((colour, shape, direction) triples never seen in training) the dense render is segmented by
colour and its centroid tracked; a prompt passes when the colour is present in most frames and the centroid moves in
the prompted direction. Coherence compares the mean frame-to-frame change of renders with that of data clips for the
same prompts. Attention structure: per layer, the share of attention mass within a 3D neighbourhood of the query
against a uniform map's share, for the trained model and for the same architecture at random init.

    python scripts/eval_toy.py --model assets/toy-wan --write-card
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dit_accel.toy.data import (
    BACKGROUNDS,
    HELD_OUT,
    centroid_track,
    motion_direction,
    render,
    scene_from_prompt_parts,
    segment_color,
)
from dit_accel.toy.judge import video_background, video_shape
from dit_accel.toy.model import build_transformer
from dit_accel.toy.pipeline import ToyVideoPipeline
from dit_accel.toy.probe import WORD_CLASSES, AttentionProbe, word_influence

SEEN = [  # training-distribution triples, for comparison with the held-out ones
    ("red", "circle", "right"),
    ("green", "square", "left"),
    ("blue", "ring", "up"),
    ("yellow", "triangle", "down"),
    ("cyan", "circle", "down"),
    ("magenta", "ring", "right"),
]


def eval_prompts(triples: list[tuple[str, str, str]], per_triple: int) -> list[dict[str, str]]:
    """Deterministic prompt list: each triple over ``per_triple`` backgrounds, rotating through them."""
    out = []
    for n, (c, s, d) in enumerate(sorted(triples)):
        for j in range(per_triple):
            bg = BACKGROUNDS[(n + j * 2) % len(BACKGROUNDS)]
            out.append({"color": c, "shape": s, "direction": d, "background": bg, "prompt": _prompt(c, s, d, bg)})
    return out


def _prompt(c: str, s: str, d: str, bg: str) -> str:
    return f"a {c} {s} moves {d} over a {bg} background"


def judge(
    video: np.ndarray, color: str, direction: str, shape: str | None = None, background: str | None = None
) -> dict[str, Any]:
    """Colour present as an object (not a wash) in >= half the frames and its centroid moving the prompted way;
    with ``shape`` / ``background``, whether the silhouette and the background read as those
    (:mod:`dit_accel.toy.judge`, no trained classifier)."""
    mask = segment_color(video, color)
    track = centroid_track(mask)
    present = float((~np.isnan(track).any(1)).mean())
    area = float(np.median(mask.mean((1, 2))))
    color_ok = present >= 0.5 and area <= 0.25
    got = motion_direction(track)
    extra: dict[str, Any] = {}
    if shape is not None:
        extra["detected_shape"] = video_shape(video, color)
        extra["shape_ok"] = extra["detected_shape"] == shape
    if background is not None:
        extra["detected_background"] = video_background(video, color)
        extra["background_ok"] = extra["detected_background"] == background
    return {
        **extra,
        "color_ok": color_ok,
        "detected_direction": got,
        "direction_ok": got == direction,
        "pass": color_ok and got == direction,
        "present_frames": round(present, 3),
        "area_fraction": round(area, 4),
    }


def frame_diff(video: np.ndarray) -> float:
    """Mean absolute change between consecutive frames (video in [0, 1])."""
    return float(np.abs(np.diff(video, axis=0)).mean())


def score_renders(
    items: list[dict[str, str]], videos: list[np.ndarray], size: tuple[int, int, int], seed: int
) -> dict[str, Any]:
    """Per prompt :func:`judge` and frame change, and the rates over all of them; the data's frame change comes
    from clips drawn for the same prompts at the same ``size`` (frames, height, width)."""
    rows, diffs, ref_diffs = [], [], []
    for it, vid in zip(items, videos):
        row = {**it, **judge(vid, it["color"], it["direction"], it["shape"], it["background"])}
        ref = render(scene_from_prompt_parts(it["color"], it["shape"], it["direction"], it["background"], seed, *size))
        diffs.append(frame_diff(vid))
        ref_diffs.append(frame_diff(ref))
        row["frame_diff"] = round(diffs[-1], 4)
        rows.append(row)

    def rate(key: str) -> float:
        return round(float(np.mean([r[key] for r in rows])), 3)

    return {
        "prompts": len(rows),
        "pass_rate": rate("pass"),
        "color_rate": rate("color_ok"),
        "direction_rate": rate("direction_ok"),
        "shape_rate": rate("shape_ok"),
        "background_rate": rate("background_ok"),
        "frame_diff_render": round(float(np.mean(diffs)), 4),
        "frame_diff_data": round(float(np.mean(ref_diffs)), 4),
        "rows": rows,
    }


def render_set(
    pipe: ToyVideoPipeline, items: list[dict[str, str]], args: argparse.Namespace, seed: int, desc: str = "render"
) -> list[np.ndarray]:
    """Dense renders, batched, each prompt with its own generator so results do not depend on the batch split."""
    videos: list[np.ndarray] = []
    for i in tqdm(range(0, len(items), args.batch), desc=desc, unit="batch", file=sys.stdout, mininterval=10):
        chunk = items[i : i + args.batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out = pipe(
            [it["prompt"] for it in chunk],
            num_frames=args.frames,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.cfg,
            generator=gens,
        ).frames
        videos.extend(list(out))
    return videos


def attention_structure(
    pipe: ToyVideoPipeline, args: argparse.Namespace, prompts: list[str], half: tuple[int, int, int]
) -> dict[str, Any]:
    """Window-mass ratio per layer from the cond branch at every step of dense renders."""
    pt, ph, pw = pipe.transformer.config.patch_size
    grid = (args.frames // pt, args.size // ph, args.size // pw)
    probe = AttentionProbe(pipe.transformer, half)
    with probe.attached(grid):
        # Uncond calls are skipped by toggling the probe from the cache context name.
        orig = pipe.transformer.cache_context

        def ctx(name: str, **kw: Any) -> Any:
            probe.enabled = name == "cond"
            return orig(name, **kw)

        pipe.transformer.cache_context = ctx  # type: ignore[method-assign]
        try:
            for j, p in enumerate(prompts):
                pipe(
                    p,
                    num_frames=args.frames,
                    height=args.size,
                    width=args.size,
                    num_inference_steps=args.steps,
                    guidance_scale=args.cfg,
                    generator=torch.Generator().manual_seed(j),
                )
        finally:
            del pipe.transformer.cache_context
    return {**probe.summary(), "renders": len(prompts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/toy-wan")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--per-triple", type=int, default=2, help="backgrounds per held-out triple")
    ap.add_argument("--seen-per-triple", type=int, default=1, help="backgrounds per seen (training) triple")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-seen", action="store_true", help="skip the seen-triple comparison")
    ap.add_argument("--probe-prompts", type=int, default=2)
    ap.add_argument("--influence-prompts", type=int, default=6, help="held-out scenes for the word-influence probe")
    ap.add_argument(
        "--write-card", action="store_true",
        help="write eval.json and samples.png into the model directory and rewrite its README.md with the numbers",
    )  # fmt: skip
    ap.add_argument("--json", default="runs/eval_toy/eval.json", help="results without --write-card")
    ap.add_argument("--samples-png", default=None, help="strip of renders (default: beside the results)")
    ap.add_argument("--card-only", action="store_true", help="rewrite the card from an existing eval.json")
    args = ap.parse_args(argv)
    for name in ("probe_prompts", "influence_prompts", "per_triple"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.card_only:
        write_card(Path(args.model), json.loads((Path(args.model) / "eval.json").read_text()))
        return 0
    torch.set_num_threads(args.threads)
    model = Path(args.model)
    pipe = ToyVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)

    result: dict[str, Any] = {
        "settings": {k: getattr(args, k) for k in ("frames", "size", "steps", "cfg", "seed", "per_triple")}
    }
    groups = {"held_out": eval_prompts(sorted(HELD_OUT), args.per_triple)}
    if not args.no_seen:
        groups["seen"] = eval_prompts(SEEN, args.seen_per_triple)
    strip: list[np.ndarray] = []
    for name, items in groups.items():
        t0 = time.perf_counter()
        videos = render_set(pipe, items, args, args.seed, desc=name)
        secs = time.perf_counter() - t0
        result[name] = score_renders(items, videos, (args.frames, args.size, args.size), args.seed)
        rows = result[name]["rows"]
        result[name]["seconds_per_render"] = round(secs / len(rows), 2)
        print(f"{name}: pass {result[name]['pass_rate']:.0%} of {len(rows)}", flush=True)
        if name == "held_out":  # one render per held-out triple (its first background), in prompt order
            strip.extend(videos[:: args.per_triple])

    half = (1, 2, 2)
    probe_prompts = [it["prompt"] for it in groups["held_out"][: args.probe_prompts]]
    result["attention_trained"] = attention_structure(pipe, args, probe_prompts, half)
    torch.manual_seed(0)
    random_tf = build_transformer(_model_cfg(pipe)).eval()
    rand_pipe = ToyVideoPipeline(transformer=random_tf, text_encoder=pipe.text_encoder, scheduler=pipe.scheduler)
    rand_pipe.set_progress_bar_config(disable=True)
    result["attention_random_init"] = attention_structure(rand_pipe, args, probe_prompts[:1], half)

    scenes = [
        (it["color"], it["shape"], it["direction"], it["background"]) for it in groups["held_out"][:: args.per_triple]
    ]
    result["word_influence"] = word_influence(
        pipe.transformer, pipe.text_encoder, scenes[: args.influence_prompts], (args.frames, args.size, args.size)
    )
    print("word influence:", result["word_influence"], flush=True)

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    pipe(groups["held_out"][0]["prompt"], generator=torch.Generator().manual_seed(0))
    result["default_render_seconds_2_threads"] = round(time.perf_counter() - t0, 1)

    # Only --write-card touches the model directory: an exploratory run (other settings) never replaces its numbers.
    out_json = model / "eval.json" if args.write_card else Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    _save_strip(strip, Path(args.samples_png) if args.samples_png else out_json.with_name("samples.png"))
    if args.write_card:
        write_card(model, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("held_out", "seen")}, indent=1))
    for name in groups:
        print(name, {k: v for k, v in result[name].items() if k != "rows"})
    return 0


def _model_cfg(pipe: ToyVideoPipeline) -> dict[str, Any]:
    c = pipe.transformer.config
    return {
        "dim": c.num_attention_heads * c.attention_head_dim,
        "heads": c.num_attention_heads,
        "layers": c.num_layers,
        "ffn_dim": c.ffn_dim,
        "patch_size": list(c.patch_size),
        "freq_dim": c.freq_dim,
        "text_dim": c.text_dim,
        "coord_channels": c.in_channels - c.out_channels,  # the same input width, so the same architecture
    }


def _save_strip(videos: list[np.ndarray], path: Path) -> None:
    """Every fourth frame of each render, one render per row."""
    import imageio.v3 as iio

    rows = [np.concatenate(list(v[::4]), axis=1) for v in videos]
    iio.imwrite(path, (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8))


def _top_mass(layer: dict[str, Any]) -> str:
    """The mass of each query's top 10% keys (the most any sparse method keeping a tenth can keep), per head."""
    if "top10_mass" not in layer:  # an eval from before the probe measured it
        return "-"
    return f"{layer['top10_mass']:.2f} ({', '.join(f'{h:.2f}' for h in layer['head_top10_mass'])})"


def write_card(model: Path, ev: dict[str, Any]) -> None:
    """Model card from the training log and these numbers."""
    log = json.loads((model / "train_log.json").read_text())
    cfg = log["config"]
    m, t = cfg["model"], cfg["train"]
    n_params = _count_params(model)
    phases = "\n".join(
        f"| {i + 1} | {p['frames']} x {p['height']} x {p['width']} | "
        f"{p['frames'] * p['height'] * p['width'] // 16} | {p['batch']} | {p['steps']} | "
        f"{p.get('sigma_shift', m['flow_shift'])} |"
        for i, p in enumerate(log["phases"])
    )
    ho, seen = ev["held_out"], ev.get("seen")
    att_t, att_r = ev["attention_trained"], ev["attention_random_init"]
    att_rows = "\n".join(
        f"| {a['layer']} | {a['window_share']:.3f} | {a['ratio_to_uniform']:.1f}x | "
        f"{', '.join(f'{h:.1f}x' for h in a['head_ratios'])} | {r['ratio_to_uniform']:.1f}x | "
        f"{_top_mass(a)} | {_top_mass(r)} |"
        for a, r in zip(att_t["layers"], att_r["layers"])
    )
    s = ev["settings"]
    seen_line = (
        f"| seen triples ({seen['prompts']} prompts) | {seen['pass_rate']:.0%} | {seen['color_rate']:.0%} | "
        f"{seen['direction_rate']:.0%} | {rate_cell(seen, 'shape_rate')} | {rate_cell(seen, 'background_rate')} | "
        f"{seen['frame_diff_render']:.4f} | {seen['frame_diff_data']:.4f} |"
        if seen
        else ""
    )
    card = f"""# toy-wan: a small text-to-video DiT trained on procedural clips

A stock diffusers `WanTransformer3DModel` (small config) in **pixel space** with a word-level text encoder
(`dit_accel.toy.ToyTextEncoder`), trained with rectified flow (velocity prediction, like Wan). It exists so that
`dit-accel render` and the quality sweep have a model with *learned* attention structure offline. Load it with:

```python
from dit_accel.toy import ToyVideoPipeline
pipe = ToyVideoPipeline.from_pretrained("assets/toy-wan")
video = pipe("a red circle moves left over a striped background").frames[0]  # (16, 64, 64, 3) in [0, 1]
```

## Config

| | |
|---|---|
| transformer | `WanTransformer3DModel`, {m["layers"]} layers, dim {m["dim"]}, \
{m["heads"]} heads x {m["dim"] // m["heads"]}, ffn {m["ffn_dim"]}, patch {tuple(m["patch_size"])}, \
{_input_channels(m)} |
| text encoder | {len(_vocab(model))} tokens ({len(_vocab(model)) - 2} words, pad, unk), embedding {m["text_dim"]}, \
{m["text_layers"]} transformer layer, \
{m["max_length"]} tokens, padded positions zero |
| parameters | {n_params} |
| scheduler | `FlowMatchEulerDiscreteScheduler`, shift {m["flow_shift"]} |
| default render | 16 frames x 64 x 64 px = 16 x 16 x 16 = **4,096 tokens** per self-attention call, \
{s["steps"]} steps, CFG {s["cfg"]} (2 transformer calls per step) |
| default render time | {ev["default_render_seconds_2_threads"]} s on 2 CPU threads (this machine, shared) |

## Data

`dit_accel.toy.data`: one (75%) or two objects (circle, square, triangle, ring; red, green, blue, yellow, cyan,
magenta) moving left/right/up/down or along a curve, growing or rotating, over plain, gradient, striped or
checkered muted backgrounds, with an optional camera pan (15% of textured backgrounds). Each clip has a caption from a
{len(_vocab(model)) - 2}-word vocabulary, e.g. "a red circle moves left over a striped background". Object size and
speed are in pixels, so low-resolution phases teach the same local statistics as the full size. Twelve
(colour, shape, direction) triples are never drawn in training (`HELD_OUT`) and are used for evaluation.
Clips are a pure function of (seed, index): the model is reproducible from `configs/toy.json`.

## Training

`python scripts/train_toy.py --config configs/toy.json` (budget `{log["budget"]}`), seed {t["seed"]}, AdamW lr
{t["lr"]} (warm-up {t["warmup_steps"]}, cosine over the last {t["decay_fraction"]:.0%}), EMA {t["ema_decay"]},
{t["cond_drop"]:.0%} empty-prompt dropout for CFG, logit-normal sigmas with the per-phase shift below.
Hardware: {log["hardware"]}; {log["steps_done"]} of {log["steps_planned"]} planned steps in
{log["train_seconds"] / 60:.0f} min. Final loss (mean of last 100 steps): {log["final_loss_mean_last_100"]:.4f}.

| phase | clip (frames x H x W) | tokens | batch | steps | training sigma shift |
|---|---|---|---|---|---|
{phases}

![loss curve](loss_curve.png)

## Evaluation (`python scripts/eval_toy.py --write-card`)

Dense renders at {s["frames"]} x {s["size"]} x {s["size"]}, {s["steps"]} steps, CFG {s["cfg"]}. A prompt passes when
its colour is segmented in at least half the frames, covers at most a quarter of the frame (an object, not a wash),
and the colour's centroid moves in the prompted direction.
Frame diff: mean |frame[t+1] - frame[t]| of the renders vs data clips of the same prompts (lower = steadier; equal =
as much change as the real motion).

Shape and background are read from the pixels by `dit_accel.toy.judge` (silhouette hole share and reach; the
simplest of plain / gradient / stripes / checkerboard that explains the background).

| prompts | pass | colour | direction | shape | background | frame diff (render) | frame diff (data) |
|---|---|---|---|---|---|---|---|
| held-out triples ({ho["prompts"]} prompts) | **{ho["pass_rate"]:.0%}** | {ho["color_rate"]:.0%} | \
{ho["direction_rate"]:.0%} | {rate_cell(ho, "shape_rate")} | {rate_cell(ho, "background_rate")} | \
{ho["frame_diff_render"]:.4f} | {ho["frame_diff_data"]:.4f} |
{seen_line}

Attention structure: share of each query's attention mass within a (2x{att_t["window_half"][0]}+1) x \
(2x{att_t["window_half"][1]}+1) x (2x{att_t["window_half"][2]}+1) token neighbourhood (time x height x width) on the
{" x ".join(map(str, att_t["grid"]))} grid, cond branch, averaged over all steps of {att_t["renders"]} held-out
render(s); a uniform map puts {att_t["uniform_share"]:.4f} there. Ratios near 1x are unstructured; high ratios are
local heads, low ones global heads. The top-10% key mass is the share of a query's softmax mass its top tenth of keys
hold (0.10 = uniform): the most a sparse method that keeps a tenth of the keys can keep, wherever they are ("-": an
evaluation from before this measure).

| layer | window share | ratio to uniform | per head | random init (same arch) | top-10% key mass (heads) | random |
|---|---|---|---|---|---|---|
{att_rows}

{_influence_section(ev)}

Samples: every fourth frame of one dense render per held-out triple, top to bottom:
{"; ".join(r["prompt"] for r in ho["rows"][:: s["per_triple"]])}.

![samples](samples.png)

## Status against the issue's targets

{_status(ev, log)}

## Limits

A toy: 64 x 64 px, a fixed grammar, {log["train_seconds"] / 3600:.1f} hours of CPU training. It is a test subject for
sparse attention, not a video generator.
"""
    (model / "README.md").write_text(card)


def _status(ev: dict[str, Any], log: dict[str, Any]) -> str:
    """Plain statement of which targets are met, so the card never oversells the model."""
    ho = ev["held_out"]
    local = [a["ratio_to_uniform"] for a in ev["attention_trained"]["layers"]]
    rand = [a["ratio_to_uniform"] for a in ev["attention_random_init"]["layers"]]
    lines = [
        f"- Attention structure: local in every layer: window mass {', '.join(f'{v:.1f}x' for v in local)} the "
        f"uniform share in layers 0-{len(local) - 1} (random init: {min(rand):.1f}x to {max(rand):.1f}x). The target "
        "(at least as local per layer as the model it replaced) is judged in docs/toy_model.md."
        if min(local) > 1.5
        else f"- Attention structure: weak ({min(local):.1f}x to {max(local):.1f}x uniform).",
        f"- Default render: 4,096 tokens per self-attention call, {ev['default_render_seconds_2_threads']} s on 2 CPU "
        f"threads: **{'met' if ev['default_render_seconds_2_threads'] <= 30 else 'not met'}** (at most 30 s).",
    ]
    ratio = ho["frame_diff_render"] / max(ho["frame_diff_data"], 1e-9)
    for name, key, target in (
        ("colour", "color_rate", 0.95),
        ("motion direction", "direction_rate", 0.80),
        ("shape", "shape_rate", 0.70),
        ("background type", "background_rate", 0.70),
    ):
        if key in ho:
            met = "met" if ho[key] >= target else "not met"
            lines.append(f"- {name.capitalize()}: {ho[key]:.0%} of held-out prompts (target {target:.0%}): **{met}**.")
    lines.append(
        f"- Temporal coherence: renders change {ratio:.1f}x as much from frame to frame as the data (target at most "
        f"1.5x): **{'met' if ratio <= 1.5 else 'not met'}**."
    )
    inf = ev.get("word_influence", {}).get("sigma_0.9")
    if inf:
        lines.append(
            "- Word influence at sigma 0.9 (change of the predicted clean video when the word is swapped): "
            + ", ".join(f"{c} {inf[c]:.4f}" for c in inf)
            + "."
        )
    lines.append(
        f"- Training so far: {log['steps_done']:,} steps ({log['train_seconds'] / 60:.0f} min) on "
        f"{log.get('hardware', 'unknown hardware')}, "
        f"{_clips(log['phases'], log['steps_done']):,} clips; docs/toy_model.md has the recipe's experiments."
    )
    for event in log.get("history", []):
        lines.append(f"- Run history: {event}")
    return "\n".join(lines)


def rate_cell(rates: dict[str, Any], key: str) -> str:
    """A rate as a table cell; "-" for results from before the shape and background judge (eval and proxy)."""
    return f"{rates[key]:.0%}" if key in rates else "-"


def _input_channels(m: dict[str, Any]) -> str:
    from dit_accel.toy.model import coord_channels

    n = coord_channels(m)
    planes = f" + {n} coordinate planes, `coord_channels`" if n else ""
    return f"{3 + n} input channels (RGB in [-1, 1]{planes}), 3 output channels"


def _clips(phases: list[dict[str, Any]], steps: int) -> int:
    """Training clips drawn in the first ``steps`` steps of a curriculum."""
    total = 0
    for ph in phases:
        n = min(ph["steps"], max(steps, 0))
        total, steps = total + n * ph["batch"], steps - n
    return total


def _influence_section(ev: dict[str, Any]) -> str:
    """Which prompt words steer the prediction (dit_accel.toy.probe.word_influence); older evals lack it."""
    inf = ev.get("word_influence")
    if not inf:
        return ""
    head = " | ".join(WORD_CLASSES)
    rows = "\n".join(
        f"| {key.removeprefix('sigma_')} | " + " | ".join(f"{v[c]:.4f}" for c in WORD_CLASSES) + " |"
        for key, v in inf.items()
    )
    return f"""Which words steer the model: mean |change| of the predicted clean video (pixels in [-1, 1]) when one word
of a held-out prompt is swapped for another of its class, same noise and sigma (`dit_accel.toy.probe.word_influence`).
A word near 0 is ignored.

| sigma | {head} |
|---|{"---|" * len(WORD_CLASSES)}
{rows}"""


def _count_params(model: Path) -> str:
    from safetensors import safe_open

    total = 0
    for f in sorted(model.glob("*/diffusion_pytorch_model.safetensors")):
        with safe_open(str(f), "pt") as fh:
            total += sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())
    return f"{total / 1e6:.2f} M"


def _vocab(model: Path) -> list[str]:
    return json.loads((model / "text_encoder" / "config.json").read_text())["vocab"]


if __name__ == "__main__":
    raise SystemExit(main())
