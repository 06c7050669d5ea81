import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks.hooks import CacheContext

from dit_accel.state import StepTracker


def test_cache_context_step_and_branch_win():
    tracker = StepTracker()
    s = tracker.begin(torch.tensor([999.0]), CacheContext("cond", step_index=4, num_inference_steps=10), None)
    assert (s.step, s.num_steps, s.branch) == (4, 10, "cond")
    s = tracker.begin(torch.tensor([999.0]), CacheContext("uncond", step_index=4, num_inference_steps=10), None)
    assert (s.step, s.branch) == (4, "uncond")


def test_timestep_matched_against_scheduler_when_no_step_in_context():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    tracker = StepTracker(scheduler=sched)
    for i, t in enumerate(sched.timesteps):
        state = tracker.begin(t.expand(2), CacheContext("cond_uncond"), None)
        assert (state.step, state.num_steps, state.branch) == (i, 6, "cond_uncond")


def test_two_calls_per_step_get_distinct_branches_without_context():
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(3)
    tracker = StepTracker(scheduler=sched)
    seen = []
    for t in sched.timesteps:
        for _ in range(2):
            s = tracker.begin(t, None, None)
            seen.append((s.step, s.branch))
    assert seen == [(0, "pass0"), (0, "pass1"), (1, "pass0"), (1, "pass1"), (2, "pass0"), (2, "pass1")]


def test_bare_transformer_counts_timesteps_and_detects_new_generation():
    tracker = StepTracker(num_steps_hint=3)
    steps = [tracker.begin(torch.tensor(t), None, None).step for t in (900.0, 900.0, 500.0, 100.0)]
    assert steps == [0, 0, 1, 2]
    gen = tracker.state.generation
    state = tracker.begin(torch.tensor(900.0), None, None)
    assert state.step == 0 and state.generation == gen + 1 and state.num_steps == 3


def test_new_generation_resets_step_position():
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(4)
    tracker = StepTracker(scheduler=sched)
    tracker.begin(sched.timesteps[2], None, None)
    tracker.new_generation()
    assert tracker.begin(sched.timesteps[0], None, None).step == 0
