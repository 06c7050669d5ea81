"""Denoising state: which step, which CFG branch, which generation, and the token layout of this forward.

A diffusers ``ModelHook`` on each transformer fills it before every forward. The step comes from the cache
context diffusers pipelines open around each call (``cache_context("cond", step_index=i, ...)``) when it
carries one, otherwise from matching the ``timestep`` argument against the scheduler's timesteps
(``scheduler.step_index`` is still None on the first forward), otherwise from counting distinct timesteps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .layout import TokenLayout

__all__ = ["DenoiseState", "StepTracker"]


@dataclass
class DenoiseState:
    """Where the current transformer forward sits in the denoising loop."""

    step: int = 0
    num_steps: int | None = None
    branch: str = "pass0"
    generation: int = 0
    timestep: float | None = None
    layout: TokenLayout | None = None
    active: bool = False
    #: ``(perm, inv)`` when the model's tokens run in that order for this whole forward
    #: (``tile_permutation="per_forward"``: the attention inputs arrive as ``x[:, :, perm]``), else None
    token_order: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class StepTracker:
    """Turns the signals of one forward (cache context, timestep) into a step index and a branch.

    ``scheduler`` is a scheduler or a callable returning the one in use now (the pipeline's, read at every
    forward, so replacing ``pipe.scheduler`` after ``accelerate`` keeps the steps right).
    ``steps_backwards`` counts forwards whose step went below the previous one without a new generation having
    been started (a scheduler the tracker cannot follow); each starts a new generation, and the first warns.
    ``timestep_rises``: the model's timestep goes up as denoising proceeds (MiniMax-H3), so with no scheduler to
    match, a new generation starts when it drops rather than when it rises.
    ``new_timesteps_new_generation``: the scheduler's timesteps set anew (``set_timesteps`` makes a new tensor)
    start a new generation, for pipelines that reset no hooks after a call (MiniMax-H3's modular pipeline: without
    it a second call would read as the step going back).
    """

    scheduler: Any = None
    num_steps_hint: int | None = None
    timestep_rises: bool = False
    new_timesteps_new_generation: bool = False
    state: DenoiseState = field(default_factory=DenoiseState)
    _last_timestep: float | None = None
    _calls_this_step: int = 0
    _last_step: int = -1
    _fresh: bool = True
    steps_backwards: int = 0
    _timesteps_key: tuple | None = None
    _timesteps_host: list[float] | None = None
    _timesteps_renewed: bool = False

    def new_generation(self) -> None:
        """Forget the step position; the next forward starts a new generation."""
        self.state.generation += 0 if self._fresh else 1
        self._fresh = True
        self._last_timestep = None
        self._calls_this_step = 0
        self._last_step = -1

    def begin(self, timestep: torch.Tensor | float | None, context: Any, layout: TokenLayout | None) -> DenoiseState:
        """Update and return the state for a forward about to run."""
        step, num_steps, t = None, None, None
        ctx_step = getattr(context, "step_index", None)
        if ctx_step is not None:  # the pipeline says the step: the timestep is not read (no host sync)
            step = int(ctx_step)
            num_steps = getattr(context, "num_inference_steps", None)
        else:
            t = _timestep_value(timestep)  # the one host sync of a forward
            timesteps = self._host_timesteps()
            if self._timesteps_renewed and self.new_timesteps_new_generation and not self._fresh:
                self.new_generation()
            self._timesteps_renewed = False
            if t is not None and timesteps is not None:
                step = min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - t))  # first of ties, as argmin
                num_steps = len(timesteps)
        if step is None:  # bare transformer: count distinct timesteps
            if self._last_timestep is not None and t is not None and self._restarts(t, self._last_timestep):
                self.new_generation()
            if self._last_timestep is None or t is None or abs(t - self._last_timestep) > 1e-6:
                step = self._last_step + 1
            else:
                step = self._last_step
        elif step < self._last_step:
            self._went_backwards(step)
            self.new_generation()
        if num_steps is None:
            num_steps = self.num_steps_hint

        self._calls_this_step = self._calls_this_step + 1 if step == self._last_step else 0
        name = getattr(context, "name", None) if context is not None else None
        branch = str(name) if name else f"pass{self._calls_this_step}"
        self._last_step = step
        self._last_timestep = t
        self._fresh = False
        self.state.step = step
        self.state.num_steps = int(num_steps) if num_steps is not None else None
        self.state.branch = branch
        self.state.timestep = t
        self.state.layout = layout
        self.state.active = True
        return self.state

    def _restarts(self, t: float, last: float) -> bool:
        """Whether timestep ``t`` after ``last`` goes back towards noise: a new generation of a bare transformer."""
        return t < last - 1e-6 if self.timestep_rises else t > last + 1e-6

    def end(self) -> None:
        self.state.active = False

    def _went_backwards(self, step: int) -> None:
        self.steps_backwards += 1
        if self.steps_backwards == 1:
            warnings.warn(
                f"dit_accel: the denoising step went back from {self._last_step} to {step} within one generation; "
                "caches were reset and the schedule restarted (counted as steps_backwards in stats()). Does the "
                "pipeline call the transformer outside its scheduler's timesteps?",
                RuntimeWarning,
                stacklevel=3,
            )

    def _scheduler(self) -> Any:
        source = self.scheduler
        return source() if callable(source) and not hasattr(source, "timesteps") else source

    def _host_timesteps(self) -> list[float] | None:
        """The scheduler's timesteps (float32 values) on the host, copied once per timesteps tensor (a
        scheduler's ``set_timesteps`` makes a new one), so matching a step costs no device sync."""
        timesteps = getattr(self._scheduler(), "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
            return None
        key = (id(timesteps), timesteps.data_ptr(), timesteps._version, timesteps.shape)
        if self._timesteps_key != key:
            self._timesteps_renewed = self._timesteps_key is not None
            self._timesteps_key = key
            self._timesteps_host = timesteps.detach().float().cpu().tolist()
        return self._timesteps_host


def _timestep_value(timestep: torch.Tensor | float | None) -> float | None:
    """One number per forward: the largest timestep (Wan2.2 TI2V passes one per token)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().float().max().item())
    return float(timestep)
