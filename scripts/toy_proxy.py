"""Short proxy runs for finding the toy model's training recipe: train a variant for a fixed number of steps on small
clips, then measure what the long run must get right (does the model read the direction and shape words, and do its
renders move the way the prompt says), so hypotheses are compared in minutes instead of hours.

A variant is the project's config (``configs/toy.json``) with dotted overrides, e.g.
``--set train.lr=0.001 --set model.heads=4 --set train.motion_weights=[1,1,1,1,0,0,0]``. Runs are step-counted (not
timed), so contention on the CPU changes how long they take, not what they measure; state is checkpointed every
250 steps and a rerun with the same ``--name`` resumes. Each run writes ``runs/toy-proxy/<name>/result.json``;
``--table`` prints every result side by side (the table in docs/toy_model.md).

    python scripts/toy_proxy.py --name baseline
    python scripts/toy_proxy.py --name directional --set train.motion_weights=[1,1,1,1,0,0,0] \
        --set train.two_object_prob=0 --set train.pan_prob=0
    python scripts/toy_proxy.py --table
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_toy import eval_prompts, rate_cell, render_set, score_renders  # noqa: E402
from train_toy import Trainer  # noqa: E402

from dit_accel.toy.data import HELD_OUT  # noqa: E402
from dit_accel.toy.model import build_scheduler  # noqa: E402
from dit_accel.toy.pipeline import ToyVideoPipeline  # noqa: E402
from dit_accel.toy.probe import AttentionProbe, word_influence  # noqa: E402

ROOT = Path("runs/toy-proxy")


def apply_overrides(config: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``section.key=value`` overrides (value parsed as JSON, else kept as a string) on a copy of ``config``."""
    out = copy.deepcopy(config)
    for item in sets:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "train", "phase"):
            raise SystemExit(f"--set {item!r}: expected model.KEY=VALUE, train.KEY=VALUE or phase.KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def evaluate(trainer: Trainer, size: tuple[int, int, int], prompts: int, seed: int = 0) -> dict[str, Any]:
    """Word influence of each word class, and eval_toy's scores of dense renders (10 steps, CFG 4), at the proxy
    size (square frames)."""
    pipe = ToyVideoPipeline(
        transformer=copy.deepcopy(trainer.ema[0]).eval(),
        text_encoder=copy.deepcopy(trainer.ema[1]).eval(),
        scheduler=build_scheduler(trainer.mcfg),
    )
    pipe.set_progress_bar_config(disable=True)
    frames, height, width = size
    items = eval_prompts(sorted(HELD_OUT), 2)[:prompts]
    scenes = [(it["color"], it["shape"], it["direction"], it["background"]) for it in items[::2]]
    influence = word_influence(pipe.transformer, pipe.text_encoder, scenes, size, sigmas=(0.9, 0.6), seed=seed)
    settings = argparse.Namespace(frames=frames, size=height, steps=10, cfg=4.0, batch=4)
    pt, ph, pw = pipe.transformer.config.patch_size
    probe = AttentionProbe(pipe.transformer)
    with probe.attached((frames // pt, height // ph, width // pw)):  # every call of the renders, cond and uncond
        videos = render_set(pipe, items, settings, seed, desc="eval")
    scores = score_renders(items, videos, size, seed)
    return {
        "influence": influence,
        "attention": probe.summary(),
        **{k: scores[k] for k in ("direction_rate", "color_rate", "shape_rate", "background_rate")},
        "frame_diff_ratio": round(scores["frame_diff_render"] / max(scores["frame_diff_data"], 1e-9), 2),
        "prompts": scores["prompts"],
    }


def _top_mass(ev: dict[str, Any]) -> str:
    layers = ev.get("attention", {}).get("layers", [])  # runs from before the attention probe: none
    return " / ".join(f"{layer['top10_mass']:.2f}" for layer in layers) or "-"


def table(root: Path = ROOT) -> str:
    """Every finished proxy run, one row each (markdown)."""
    lines = [
        "| run | overrides | steps | loss (last 100) | direction infl. 0.9 / 0.6 | shape infl. 0.9 / 0.6 "
        "| colour infl. 0.9 | direction rate | colour rate | shape rate | background rate | frame diff "
        "| top-10% key mass per layer | min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(root.glob("*/result.json"), key=lambda p: p.stat().st_mtime):
        r = json.loads(path.read_text())
        inf, ev = r["eval"]["influence"], r["eval"]
        a, b = inf["sigma_0.9"], inf["sigma_0.6"]
        lines.append(
            f"| {r['name']} | {' '.join(r['sets']) or '-'} | {r['steps']} | {r['loss_last_100']:.4f} "
            f"| {a['direction']:.4f} / {b['direction']:.4f} | {a['shape']:.4f} / {b['shape']:.4f} | {a['colour']:.4f} "
            f"| {ev['direction_rate']:.0%} | {ev['color_rate']:.0%} | {rate_cell(ev, 'shape_rate')} "
            f"| {rate_cell(ev, 'background_rate')} | {ev['frame_diff_ratio']:.2f} | {_top_mass(ev)} "
            f"| {r['train_seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", help="run name (its folder under runs/toy-proxy; a rerun resumes)")
    ap.add_argument("--config", default="configs/toy.json")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="override, e.g. train.lr=0.001")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", default="8x32x32", help="frames x height x width of the training and eval clips")
    ap.add_argument("--prompts", type=int, default=24, help="held-out prompts rendered for the direction score")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="print the table of finished runs and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table())
        return 0
    if not args.name:
        ap.error("--name is required (or --table)")
    try:
        frames, height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size {args.size!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 8x32x32")
    if height != width:
        ap.error(f"--size {args.size!r}: height and width must be equal (the evaluation renders square frames)")
    torch.set_num_threads(args.threads)
    config = apply_overrides(json.loads(Path(args.config).read_text()), args.sets)
    phase = {"steps": args.steps, "batch": args.batch, "frames": frames, "height": height, "width": width}
    phase.update(config.pop("phase", {}))
    run = ROOT / args.name
    run.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, torch.device("cpu"), [phase])
    if (run / "state.pt").exists():
        trainer.load_state_dict(torch.load(run / "state.pt", weights_only=False))
        print(f"resumed {args.name} at step {trainer.step_idx}", flush=True)
    bar = tqdm(total=args.steps, initial=trainer.step_idx, desc=args.name, mininterval=30, file=sys.stdout)
    while trainer.step_idx < args.steps:
        t0 = time.perf_counter()
        trainer.step()
        trainer.seconds += time.perf_counter() - t0
        bar.update(1)
        if trainer.step_idx % 250 == 0 or trainer.step_idx == args.steps:
            torch.save(trainer.state_dict(), run / "state.tmp")
            os.replace(run / "state.tmp", run / "state.pt")
    bar.close()
    trainer.flush_losses()
    t0 = time.perf_counter()
    ev = evaluate(trainer, (frames, height, width), args.prompts)
    result = {
        "name": args.name,
        "sets": args.sets,
        "phase": phase,
        "steps": trainer.step_idx,
        "loss_last_100": float(np.mean(trainer.losses[-100:])),
        "train_seconds": round(trainer.seconds, 1),
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "threads": args.threads,
        "eval": ev,
    }
    (run / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
