"""Train the toy video DiT (dit_accel.toy) with rectified flow on procedural clips and write the model directory.

Reproducible from the config's seed: batch ``i`` is always the same clips, noise and sigmas. A curriculum spends most
steps on short, low-resolution clips (cheap attention) and finishes at the full 16 x 64 x 64 size (4,096 tokens);
Wan's 3D RoPE makes the same weights valid on every grid. On CUDA the config's "gpu" budget is used, otherwise the
smaller "cpu" one. Resumable: ``--resume`` continues from ``<state-dir>/state.pt``.

    python scripts/train_toy.py --config configs/toy.json --out assets/toy-wan
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dit_accel.toy.data import batch_tensor, caption, make_batch, sample_batch
from dit_accel.toy.model import build_scheduler, build_text_encoder, build_transformer, flow_matching_loss
from dit_accel.toy.pipeline import ToyVideoPipeline


def lr_at(step: int, total: int, tcfg: dict[str, Any]) -> float:
    """Linear warm-up, flat, then cosine decay over the last ``decay_fraction`` of training."""
    base = tcfg["lr"]
    if step < tcfg["warmup_steps"]:
        return base * (step + 1) / tcfg["warmup_steps"]
    start = int(total * (1 - tcfg["decay_fraction"]))
    if step < start:
        return base
    frac = (step - start) / max(total - start, 1)
    lo = base * tcfg["min_lr_ratio"]
    return lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * frac))


def phase_at(step: int, phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The curriculum phase that contains ``step``; a phase may override the training sigma shift."""
    for ph in phases:
        if step < ph["steps"]:
            return ph
        step -= ph["steps"]
    return phases[-1]


class Trainer:
    """Owns the models, EMA copies, optimiser and loss log; one ``step()`` is one optimiser update."""

    def __init__(self, config: dict[str, Any], device: torch.device, phases: list[dict[str, Any]]) -> None:
        self.config, self.device, self.phases = config, device, phases
        self.mcfg, self.tcfg = config["model"], config["train"]
        torch.manual_seed(self.tcfg["seed"])
        self.transformer = build_transformer(self.mcfg).to(device)
        self.text_encoder = build_text_encoder(self.mcfg).to(device)
        self.ema = [copy.deepcopy(self.transformer).eval(), copy.deepcopy(self.text_encoder).eval()]
        for m in self.ema:
            m.requires_grad_(False)
        self.params = list(self.transformer.parameters()) + list(self.text_encoder.parameters())
        self.ema_params = list(self.ema[0].parameters()) + list(self.ema[1].parameters())
        self.cuda = device.type == "cuda"
        self.opt = torch.optim.AdamW(
            self.params, lr=self.tcfg["lr"], betas=(0.9, 0.99), weight_decay=self.tcfg["weight_decay"], fused=self.cuda
        )
        self.step_idx = 0
        self.losses: list[float] = []
        self._pending: list[torch.Tensor] = []  # losses still on the device: read in groups, not once per step
        self.seconds = 0.0
        self.total = sum(p["steps"] for p in phases)
        self.history: list[str] = []  # resumes and budget changes, for the model card

    def batch_args(self, step: int) -> tuple[tuple, dict[str, float]]:
        """``make_batch`` arguments of batch ``step`` (a pure function of the config and the step)."""
        ph = phase_at(step, self.phases)
        args = (self.tcfg["seed"], step * 1024, ph["batch"], ph["frames"], ph["height"], ph["width"])
        # the data mix (see dit_accel.toy.data.sample_scene): the train section's, or the phase's own (a curriculum)
        kwargs = {key: ph.get(key, self.tcfg.get(key)) for key in ("two_object_prob", "pan_prob")}
        for key in ("motion_weights", "speed_range", "background_variety"):  # optional
            value = ph.get(key, self.tcfg.get(key))
            if value is not None:
                kwargs[key] = tuple(value) if isinstance(value, list) else value  # JSON lists, strings as they are
        return args, kwargs

    def step(self, batch: tuple | None = None) -> None:
        """One update on batch ``step_idx`` of the curriculum (``batch``: its ``(x0, prompts)``, made elsewhere).
        On CUDA the step runs in bfloat16 autocast and never waits for the device: losses are read by
        :meth:`flush_losses`, so the host queues the next step while the GPU runs this one."""
        ph = phase_at(self.step_idx, self.phases)
        if batch is None:
            args, kwargs = self.batch_args(self.step_idx)
            batch = make_batch(*args, device=self.device, **kwargs)
        x0, prompts = batch
        # noise and sigmas drawn where the model runs (a CPU draw of a GPU batch costs more than the GPU step)
        gen = torch.Generator(device=self.device).manual_seed(self.tcfg["seed"] * 1_000_003 + self.step_idx)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step_idx, self.total, self.tcfg)
        self.transformer.train()
        self.text_encoder.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            loss = flow_matching_loss(
                self.transformer,
                self.text_encoder,
                x0,
                prompts,
                ph.get("sigma_shift", self.mcfg["flow_shift"]),
                gen,
                cond_drop=self.tcfg["cond_drop"],
                device=self.device,
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.tcfg["grad_clip"])
        self.opt.step()
        self._update_ema()
        self.step_idx += 1
        self._pending.append(loss.detach())

    def flush_losses(self) -> float:
        """Move the losses of the steps taken since the last call to ``losses``; the latest one (NaN if none)."""
        if self._pending:
            self.losses.extend(torch.stack(self._pending).float().cpu().tolist())
            self._pending.clear()
        return self.losses[-1] if self.losses else float("nan")

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Warm-up form of the decay so early checkpoints are not dominated by the random init.
        d = min(self.tcfg["ema_decay"], (1 + self.step_idx) / (10 + self.step_idx))
        torch._foreach_lerp_(self.ema_params, self.params, 1 - d)

    def state_dict(self) -> dict[str, Any]:
        self.flush_losses()
        return {
            "transformer": self.transformer.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema_transformer": self.ema[0].state_dict(),
            "ema_text_encoder": self.ema[1].state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step_idx,
            "losses": self.losses,
            "seconds": self.seconds,
            "history": self.history,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.transformer.load_state_dict(sd["transformer"])
        self.text_encoder.load_state_dict(sd["text_encoder"])
        self.ema[0].load_state_dict(sd["ema_transformer"])
        self.ema[1].load_state_dict(sd["ema_text_encoder"])
        self.opt.load_state_dict(sd["opt"])
        self.step_idx, self.losses, self.seconds = sd["step"], sd["losses"], sd["seconds"]
        self.history = list(sd.get("history", []))

    def init_from(self, model_dir: Path) -> None:
        """Load a trained model directory's weights into the live and EMA models (a fine-tune: the optimiser, step
        count and loss log start fresh), and log in the history how much training those weights already had."""
        pipe = ToyVideoPipeline.from_pretrained(model_dir)
        try:
            live_models = (self.transformer, self.text_encoder)
            for live, ema, trained in zip(live_models, self.ema, (pipe.transformer, pipe.text_encoder)):
                live.load_state_dict(trained.state_dict())
                ema.load_state_dict(trained.state_dict())
        except RuntimeError as err:
            raise SystemExit(
                f"--init-from: {model_dir} does not fit the model this budget builds (model options {self.mcfg}); "
                f"use the budget it was trained with.\n{err}"
            ) from err
        log_path = model_dir / "train_log.json"
        log = json.loads(log_path.read_text()) if log_path.exists() else {}
        earlier = "; ".join(log.get("history", []))
        steps = log.get("steps_done")
        self.history.append(
            f"initialised from `{model_dir}` ({f'{steps:,}' if isinstance(steps, int) else 'unknown'} steps, "
            f"{log.get('train_seconds', 0) / 3600:.2f} h on {log.get('hardware', 'unknown hardware')}, budget "
            f"`{log.get('budget', '?')}`{'; its history: ' + earlier if earlier else ''})"
        )

    def export(self, out: Path, hardware: str, budget: str) -> None:
        """Write the EMA weights as a loadable pipeline directory plus the training log and loss curve."""
        self.flush_losses()
        pipe = ToyVideoPipeline(
            transformer=copy.deepcopy(self.ema[0]).cpu(),
            text_encoder=copy.deepcopy(self.ema[1]).cpu(),
            scheduler=build_scheduler(self.mcfg),
        )
        tmp = out.with_name(out.name + ".tmp")
        pipe.save_pretrained(tmp)
        log = {
            "config": self.config,
            "budget": budget,
            "phases": self.phases,
            "steps_done": self.step_idx,
            "steps_planned": self.total,
            "train_seconds": round(self.seconds, 1),
            "hardware": hardware,
            "final_loss_mean_last_100": sum(self.losses[-100:]) / max(len(self.losses[-100:]), 1),
            "history": self.history,
            "losses": [round(v, 5) for v in self.losses],
        }
        (tmp / "train_log.json").write_text(json.dumps(log))
        plot_losses(self.losses, self.phases, tmp / "loss_curve.png")
        for name in ("MODEL_CARD.md", "README.md", "eval.json"):  # keep hand-written / eval files across exports
            if (out / name).exists():
                (tmp / name).write_bytes((out / name).read_bytes())
        if out.exists():
            old = out.with_name(out.name + ".old")
            os.rename(out, old)
            os.rename(tmp, out)
            _rmtree(old)
        else:
            os.rename(tmp, out)


def _rmtree(path: Path) -> None:
    for p in sorted(path.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    path.rmdir()


def _sample_batch_star(job: tuple[tuple, dict[str, float]]) -> list:
    args, kwargs = job
    return sample_batch(*args, **kwargs)


class Prefetcher:
    """Draws the next batches' scenes in worker processes while the GPU trains (sampling a scene is Python, slower
    per batch than a small model's GPU step); the pixels are then drawn on the device by ``render_batch``, so only
    the small scene descriptions cross processes. Same batches, same order as making them inline. The pool forks
    (on Linux) before the model is built, so workers start at once; they never touch CUDA."""

    def __init__(self, workers: int, ahead: int) -> None:
        import concurrent.futures
        import multiprocessing

        self.ahead = ahead
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        for started in [self.pool.submit(int) for _ in range(workers)]:  # workers start on demand: start them now
            started.result()
        self.pending: dict[int, concurrent.futures.Future] = {}

    def get(self, trainer: Trainer, step: int, last: int) -> tuple:
        for s in range(step, min(step + self.ahead, last)):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(_sample_batch_star, trainer.batch_args(s))
        scenes = self.pending.pop(step).result()
        return batch_tensor(scenes, trainer.device), [caption(sc) for sc in scenes]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def fit_phases(config: dict[str, Any], device: torch.device, phases: list[dict[str, Any]], seconds: float):
    """The curriculum scaled (same proportions) so that its steps take about ``seconds`` on this device: a few
    timed steps per phase on a throwaway model, data making excluded (the prefetcher hides it)."""
    probe = Trainer(config, device, phases)
    per_step = []
    for i in range(len(phases)):
        first = sum(p["steps"] for p in phases[:i])
        args, kwargs = probe.batch_args(first)
        batch = make_batch(*args, device=device, **kwargs)
        times = []
        for _ in range(4):
            probe.step_idx = first
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            probe.step(batch)
            probe.flush_losses()  # waits for the device, like a synchronise
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        per_step.append(min(times[1:]))
    planned = sum(p["steps"] * t for p, t in zip(phases, per_step))
    factor = seconds / planned
    fitted = [dict(p, steps=max(1, round(p["steps"] * factor))) for p in phases]
    del probe
    return fitted, factor, per_step


def plot_losses(losses: list[float], phases: list[dict[str, Any]], path: Path) -> None:
    """Raw and smoothed loss against step, with the curriculum phase boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(losses, lw=0.4, alpha=0.35, color="tab:blue", label="loss")
    smooth, acc = [], None
    for v in losses:
        acc = v if acc is None else 0.98 * acc + 0.02 * v
        smooth.append(acc)
    ax.plot(smooth, lw=1.5, color="tab:blue", label="EMA(0.98)")
    edge = 0
    for ph in phases[:-1]:
        edge += ph["steps"]
        if edge < len(losses):
            ax.axvline(edge, color="gray", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title("toy-wan training loss (dashes: curriculum phase changes)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/toy.json")
    ap.add_argument("--out", default="assets/toy-wan", help="model directory to write")
    ap.add_argument("--state-dir", default="runs/toy-train", help="resumable training state (not committed)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--budget", default=None, help="budget name in the config (default: gpu on CUDA, else cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the budget's)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests)")
    ap.add_argument(
        "--seconds", type=float, default=None,
        help="fit the budget's curriculum (same proportions, full LR schedule) to about this many seconds of "
        "training on this device; training also stops and exports when they are up",
    )  # fmt: skip
    ap.add_argument("--workers", type=int, default=None, help="data processes (default: CPUs - 2 on CUDA, else 0)")
    ap.add_argument(
        "--init-from", default=None, metavar="MODEL_DIR",
        help="start a fresh run (new optimiser, the budget's schedule) from a trained model directory's weights",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.init_from and args.resume:
        ap.error("--init-from starts a new run from a model's weights; --resume continues a run's own state")

    config = json.loads(Path(args.config).read_text())
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    budget = args.budget or ("gpu" if use_cuda else "cpu")
    bcfg = config["budgets"][budget]
    # a budget may set its own lr, ... and model options (e.g. coord_channels): a fresh run's architecture
    config = {**config, **{k: {**config[k], **bcfg.get(k, {})} for k in ("model", "train")}}
    threads = args.threads if args.threads is not None else bcfg.get("threads", 0)
    if threads:
        torch.set_num_threads(threads)
    hardware = torch.cuda.get_device_name(0) if use_cuda else f"CPU, {torch.get_num_threads()} thread(s)"

    workers = args.workers if args.workers is not None else (max(0, (os.cpu_count() or 1) - 2) if use_cuda else 0)
    prefetch = Prefetcher(workers, 2 * workers) if workers > 0 else None  # before any model exists
    phases = bcfg["phases"]
    if args.seconds is not None:
        if args.resume:
            ap.error("--seconds fits a fresh curriculum; it cannot be combined with --resume")
        phases, factor, per_step = fit_phases(config, device, phases, args.seconds)
        budget = f"{budget}, fitted to {args.seconds:.0f} s (x{factor:.3f} steps)"
        print(f"seconds per step by phase: {[round(t, 4) for t in per_step]}; steps x{factor:.3f}: "
              f"{[p['steps'] for p in phases]}", flush=True)  # fmt: skip
    trainer = Trainer(config, device, phases)
    state_dir, out = Path(args.state_dir), Path(args.out)
    state_dir.mkdir(parents=True, exist_ok=True)
    if args.resume and (state_dir / "state.pt").exists():
        try:
            trainer.load_state_dict(torch.load(state_dir / "state.pt", map_location=device, weights_only=False))
        except RuntimeError as err:  # a size mismatch: the state was trained with other model options
            raise SystemExit(
                f"--resume: {state_dir / 'state.pt'} does not fit the model that --budget {budget} builds "
                f"(model options {config['model']}); resume with the budget it was trained with.\n{err}"
            ) from err
        print(f"resumed at step {trainer.step_idx}", flush=True)
        trainer.history.append(
            f"resumed at step {trainer.step_idx:,} with budget `{budget}` ({trainer.total:,} steps planned); the "
            "learning-rate schedule follows the new plan from there"
        )
    elif args.init_from:
        trainer.init_from(Path(args.init_from))
        print(f"initialised from {args.init_from}", flush=True)
    total = trainer.total if args.max_steps is None else min(trainer.total, args.max_steps)
    every, log_every = config["train"]["ckpt_every"], config["train"]["log_every"]

    def checkpoint() -> None:
        torch.save(trainer.state_dict(), state_dir / "state.tmp")
        os.replace(state_dir / "state.tmp", state_dir / "state.pt")
        trainer.export(out, hardware, budget)

    if args.seconds is not None:
        every = max(every, total // 4)
    deadline = None if args.seconds is None else time.perf_counter() + args.seconds * 1.15
    bar = tqdm(total=total, initial=trainer.step_idx, mininterval=20, file=sys.stdout, dynamic_ncols=False)
    while trainer.step_idx < total:
        if deadline is not None and time.perf_counter() > deadline:
            print(f"time is up at step {trainer.step_idx} of {total}", flush=True)
            checkpoint()
            break
        t0 = time.perf_counter()  # drawing the batch counts: on CUDA it is drawn on the device
        batch = prefetch.get(trainer, trainer.step_idx, total) if prefetch else None
        trainer.step(batch)
        if trainer.step_idx % log_every == 0:  # the host waits for the device here, so the time below is real
            ph = phase_at(trainer.step_idx - 1, trainer.phases)
            loss = trainer.flush_losses()
            bar.set_postfix_str(f"loss={loss:.4f} grid={ph['frames']}x{ph['height']}x{ph['width']}", refresh=False)
        trainer.seconds += time.perf_counter() - t0
        bar.update(1)
        if trainer.step_idx % every == 0 or trainer.step_idx == total:
            checkpoint()
    bar.close()
    if prefetch:
        prefetch.close()
    print(f"done: {trainer.step_idx} steps in {trainer.seconds / 60:.1f} min; model in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
