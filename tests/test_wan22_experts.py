"""Wan 2.2's two experts on a tiny real ``WanPipeline`` (``transformer`` + ``transformer_2``, ``boundary_ratio``).

The tiny pipeline runs 4 steps at timesteps about 1000, 934, 781, 47 with the boundary at 875: the high-noise
``transformer`` runs steps 0-1 and the low-noise ``transformer_2`` steps 2-3, each twice (cond and uncond), two
self-attention layers each. Step options count the pipeline's global step for both experts; each expert's
patterns, statistics and residuals are its own.
"""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_pipeline

LAYERS, BRANCHES = 2, 2


def run(pipe, kwargs):
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture(scope="module")
def wan22():
    pipe, kwargs = tiny_pipeline("wan22")
    return pipe, kwargs, run(pipe, kwargs)


def _expert_stats(handle):
    return handle.stats()["transformers"]


def test_both_experts_are_hooked_and_each_runs_its_own_global_steps(wan22):
    pipe, kwargs, base = wan22
    with dit_accel.accelerate(pipe, "dense", min_tokens=64) as handle:
        out = run(pipe, kwargs)
        experts = _expert_stats(handle)
    assert torch.equal(out, base)  # bit-exact: the dense path is the model's own SDPA call
    assert torch.equal(run(pipe, kwargs), base)  # and remove() restores both experts
    assert set(experts) == {"transformer", "transformer_2"}
    # bug this catches: the low-noise expert counting its steps from 0 instead of the pipeline's step k
    assert experts["transformer"]["steps"] == [0, 1]
    assert experts["transformer_2"]["steps"] == [2, 3]
    for name in experts:
        assert experts[name]["forwards"] == 2 * BRANCHES
        assert experts[name]["overall"]["dense_reasons"] == {"method": 2 * BRANCHES * LAYERS}
    for module in (pipe.transformer, pipe.transformer_2):
        assert not hasattr(module, "_dit_accel_accelerator")


def test_per_transformer_options_apply_to_that_expert_only(wan22):
    pipe, kwargs, base = wan22
    handle = dit_accel.accelerate(
        pipe, "blocktopk", sparsity=0.75, min_tokens=64, per_transformer={"transformer_2": {"sparsity": 0.5}}
    )
    out = run(pipe, kwargs)
    experts = _expert_stats(handle)
    stats = handle.stats()
    handle.remove()
    assert not torch.equal(out, base)
    assert experts["transformer"]["config"]["sparsity"] == 0.75
    assert experts["transformer_2"]["config"]["sparsity"] == 0.5
    n_k = 256 // 64  # key blocks per call (2 latent frames of 8 x 16 tokens)
    assert experts["transformer"]["overall"]["block_density"] == pytest.approx(round(0.25 * n_k) / n_k)
    assert experts["transformer_2"]["overall"]["block_density"] == pytest.approx(round(0.5 * n_k) / n_k)
    for name in experts:  # the sparse calls reached dit_accel's SDPA interception in both experts
        assert experts[name]["overall"]["sparse_calls"] == 2 * BRANCHES * LAYERS
    assert stats["overall"]["sparse_calls"] == 2 * 2 * BRANCHES * LAYERS
    assert torch.equal(run(pipe, kwargs), base)


def test_dense_steps_count_the_global_step_for_each_expert(wan22):
    pipe, kwargs, _ = wan22
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, dense_steps=1)
    run(pipe, kwargs)
    high, low = _expert_stats(handle).values()
    # step 0 is dense; the low-noise expert starts at step 2, past dense_steps=1, so none of its calls is dense
    assert high["overall"]["dense_reasons"] == {"dense_step": BRANCHES * LAYERS}
    assert low["overall"]["dense_calls"] == 0
    # a per-expert dense_steps is global too: 3 keeps the low-noise expert's step 2 dense, not its first 3 steps
    handle = dit_accel.accelerate(
        pipe, "blocktopk", min_tokens=64, dense_steps=1, per_transformer={"transformer_2": {"dense_steps": 3}}
    )
    run(pipe, kwargs)
    high, low = _expert_stats(handle).values()
    handle.remove()
    assert high["overall"]["dense_reasons"] == {"dense_step": BRANCHES * LAYERS}
    assert low["overall"]["dense_reasons"] == {"dense_step": BRANCHES * LAYERS}
    assert low["overall"]["sparse_calls"] == BRANCHES * LAYERS


def _decisions(handle) -> dict[str, set[tuple[int, str]]]:
    """Per expert, the (global step, decision) of every self-attention call, from the sites' observers."""
    seen: dict[str, set[tuple[int, str]]] = {}
    for name, acc in handle.accelerators.items():
        record = seen.setdefault(name, set())
        acc.observers.append(lambda event, record=record: record.add((event.step, event.kind)))
    return seen


def test_an_expert_never_uses_the_other_experts_residual_or_pattern(wan22):
    pipe, kwargs, _ = wan22
    # rettention: statistics (rho, residual) from a refresh; refresh_every=3 counts steps since the last refresh.
    # The high-noise expert refreshes at step 1 (step 0 is dense). Were the caches shared, the low-noise expert
    # would reuse that residual at steps 2 and 3 (both within 3 steps of step 1); its own cache is empty, so it
    # refreshes at its first step, 2, and runs sparse on its own statistics at step 3.
    handle = dit_accel.accelerate(pipe, "rettention", min_tokens=64, dense_steps=1, refresh_every=3)
    seen = _decisions(handle)
    run(pipe, kwargs)
    experts = _expert_stats(handle)
    handle.remove()
    assert seen["transformer"] == {(0, "dense"), (1, "refresh")}
    assert seen["transformer_2"] == {(2, "refresh"), (3, "sparse")}
    low = experts["transformer_2"]["overall"]
    assert (low["dense_calls"], low["refresh_calls"], low["sparse_calls"]) == (0, 4, 4)
    # blocktopk with reuse_pattern_every=4: each expert builds its own pattern at its first step, then reuses it
    # (shared, the low-noise expert would reuse the pattern built at step 0 at both its steps)
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, reuse_pattern_every=4)
    run(pipe, kwargs)
    experts = _expert_stats(handle)
    handle.remove()
    for name in experts:
        overall = experts[name]["overall"]
        assert (overall["pattern_builds"], overall["pattern_reuses"]) == (BRANCHES * LAYERS, BRANCHES * LAYERS)


def test_per_transformer_can_choose_another_method_for_one_expert(wan22):
    pipe, kwargs, _ = wan22
    with dit_accel.accelerate(
        pipe, "blocktopk", min_tokens=64, per_transformer={"transformer": {"method": "dense"}}
    ) as handle:
        run(pipe, kwargs)
        experts = _expert_stats(handle)
    assert experts["transformer"]["config"]["method"] == "dense"
    assert experts["transformer"]["overall"]["dense_reasons"] == {"method": 2 * BRANCHES * LAYERS}
    assert experts["transformer_2"]["overall"]["sparse_calls"] == 2 * BRANCHES * LAYERS


@pytest.mark.parametrize(
    ("per_transformer", "match"),
    [
        ({"transformer_3": {"sparsity": 0.8}}, r"'transformer_3'.*allowed: transformer, transformer_2"),
        ({"vae": {}}, r"'vae'.*allowed: transformer, transformer_2"),
        ({"transformer_2": {"sparsty": 0.8}}, r"per_transformer\['transformer_2'\].*'sparsty'.*allowed: .*sparsity"),
        ({"transformer_2": {"sparsity": 2.0}}, r"per_transformer\['transformer_2'\]: .*sparsity"),
        ({"transformer_2": {"method": "nope"}}, r"per_transformer\['transformer_2'\]: method='nope'"),
        ({"transformer_2": 0.8}, r"per_transformer\['transformer_2'\]=0.8 must be a dict"),
        ([("transformer_2", {})], r"per_transformer=.* must be a dict"),
    ],
)
def test_per_transformer_errors_name_what_is_allowed(wan22, per_transformer, match):
    pipe, _, _ = wan22
    with pytest.raises(ValueError, match=match):
        dit_accel.accelerate(pipe, "blocktopk", per_transformer=per_transformer)
    for module in (pipe.transformer, pipe.transformer_2):  # nothing installed on either expert
        assert not hasattr(module, "_dit_accel_accelerator")
        assert not hasattr(module, "_diffusers_hook") or not module._diffusers_hook.hooks


def test_a_per_transformer_dense_backend_is_checked_like_the_shared_one(wan22):
    from dit_accel.api import xformers_available

    if xformers_available():
        pytest.skip("xformers is installed: the backend is allowed")
    pipe, _, _ = wan22
    with pytest.raises(ValueError, match="dense_backend='xformers' needs xformers"):
        dit_accel.accelerate(pipe, "blocktopk", per_transformer={"transformer_2": {"dense_backend": "xformers"}})
    assert not hasattr(pipe.transformer, "_dit_accel_accelerator")


def test_per_transformer_on_a_single_transformer_pipeline_names_its_one_component():
    pipe, _ = tiny_pipeline("wan")
    with pytest.raises(ValueError, match=r"'transformer_2'.*allowed: transformer$"):
        dit_accel.accelerate(pipe, "blocktopk", per_transformer={"transformer_2": {"sparsity": 0.8}})
    with dit_accel.accelerate(pipe, "blocktopk", per_transformer={"transformer": {"sparsity": 0.5}}) as handle:
        assert handle.accelerators["transformer"].config.sparsity == 0.5


def test_the_documented_two_expert_example_prints_what_it_says(capsys):
    """docs/python.md's per-expert example runs and prints the lines its comments show."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "python.md").read_text()
    section = text[text.index("## Two experts (Wan 2.2)") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    expected = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# transformer")]
    assert len(expected) == 2
    exec(compile(code, "docs/python.md", "exec"), {})
    assert capsys.readouterr().out.splitlines() == expected
