"""``kernel_backend="auto"``: candidates checked against the reference, timed once per key, the winner cached."""

from __future__ import annotations

import math
import time
import types

import pytest
import torch

import dit_accel
from dit_accel import kernels
from dit_accel.kernels import auto, cpu, reference


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("DIT_ACCEL_KERNELS", raising=False)
    auto.clear()
    yield
    auto.clear()


def _inputs(n=256, b=1, h=2, d=16, keep=2, seed=0, block=64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    n_b = math.ceil(n / block)
    idx = torch.rand(b, h, n_b, n_b, generator=gen).topk(keep, -1).indices.sort(-1).values.to(torch.int32)
    counts = torch.full((b, h, n_b), keep, dtype=torch.int32)
    return q, k, v, idx, counts


def _plant(monkeypatch, fakes: dict[str, object], order: tuple[str, ...]) -> None:
    """Candidates named ``order`` for the CPU block-sparse call; ``fakes`` implement the planted ones."""
    monkeypatch.setitem(kernels._CANDIDATES["cpu"], "block_sparse_attention", order)
    real = kernels._module
    monkeypatch.setattr(kernels, "_module", lambda b: fakes[b] if b in fakes else real(b))


def _slow(seconds: float):
    def call(*args, **kwargs):
        time.sleep(seconds)
        return reference.block_sparse_attention(*args, **kwargs)

    return call


def _wrong(*args, **kwargs):
    out, lse = reference.block_sparse_attention(*args, **kwargs)
    return out + 0.5, lse  # instant and wrong: must never be chosen


def _raises(*args, **kwargs):
    raise RuntimeError("no kernel for this shape")


def test_auto_picks_the_fastest_candidate_that_agrees_with_the_reference(monkeypatch):
    fast = types.SimpleNamespace(block_sparse_attention=cpu.block_sparse_attention)
    slow = types.SimpleNamespace(block_sparse_attention=_slow(0.05))
    wrong = types.SimpleNamespace(block_sparse_attention=_wrong)
    broken = types.SimpleNamespace(block_sparse_attention=_raises)
    _plant(
        monkeypatch, {"slow": slow, "fast": fast, "wrong": wrong, "broken": broken}, ("slow", "wrong", "broken", "fast")
    )
    q, k, v, idx, counts = _inputs()
    kw = dict(block_m=64, block_n=64)
    with kernels.use_backend("auto") as policy:
        out, lse = kernels.block_sparse_attention(q, k, v, idx, counts, **kw)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, idx, counts, **kw)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    [choice] = auto.choices().values()
    assert choice.backend != "wrong" and choice.backend != "slow"
    assert set(choice.excluded) == {"wrong", "broken"}
    assert "differs from the reference" in choice.excluded["wrong"] and "RuntimeError" in choice.excluded["broken"]
    assert "wrong" not in choice.seconds and choice.seconds["slow"] >= 0.05
    assert auto.counters()["excluded"] == 2
    assert list(policy.used.values()) == [choice.backend]


def test_a_wrong_backend_is_never_selected_even_alone(monkeypatch):
    _plant(monkeypatch, {"wrong": types.SimpleNamespace(block_sparse_attention=_wrong)}, ("wrong",))
    q, k, v, idx, counts = _inputs()
    with kernels.use_backend("auto"):
        out, _ = kernels.block_sparse_attention(q, k, v, idx, counts, block_m=64, block_n=64)
        again, _ = kernels.block_sparse_attention(q, k, v, idx, counts, block_m=64, block_n=64)
    want = reference.block_sparse_attention(q, k, v, idx, counts, block_m=64, block_n=64)[0]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-5)
    assert next(iter(auto.choices().values())).backend == "reference"


def test_the_cache_is_hit_on_the_second_call_and_buckets_time_apart():
    q, k, v, idx, counts = _inputs(keep=1)
    kw = dict(block_m=64, block_n=64)
    with kernels.use_backend("auto"):
        kernels.block_sparse_attention(q, k, v, idx, counts, **kw)
        first = auto.counters()
        assert first["timed"] == 1 and first["timings"] == 2 * auto.REPEATS  # cpu and the reference
        kernels.block_sparse_attention(q, k, v, idx, counts, **kw)
        second = auto.counters()
        assert second["timings"] == first["timings"] and second["hits"] == 1
        # another density bucket (a wider LUT), another shape, no LSE: each timed on its own first call
        q2, k2, v2, idx2, counts2 = _inputs(keep=3, seed=1)
        kernels.block_sparse_attention(q2, k2, v2, idx2, counts2, **kw)
        kernels.block_sparse_attention(*_inputs(n=320, keep=1, seed=2), **kw)
        kernels.block_sparse_attention(q, k, v, idx, counts, return_lse=False, **kw)
    assert auto.counters()["timed"] == 4
    assert sorted(key[6] for key in auto.choices()) == [0.2, 0.25, 0.25, 0.75]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_output_equals_the_reference_with_padding_and_reshape(dtype):
    q, k, v, idx, counts = (t.to(dtype) if t.is_floating_point() else t for t in _inputs(n=200, keep=2, seed=3))
    gen = torch.Generator().manual_seed(4)
    kp = torch.rand(1, 200, generator=gen) > 0.2
    rho = torch.rand(1, 2, 200, generator=gen)
    residual = torch.randn(1, 2, 200, 16, generator=gen).to(dtype)
    kw = dict(block_m=64, block_n=64, key_padding=kp, rho=rho, residual=residual, rho_add=0.1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for _ in range(2):  # the timed first call and the cached second
        with kernels.use_backend("auto"):
            out, lse = kernels.block_sparse_attention(q, k, v, idx, counts, **kw)
            pair = kernels.block_sparse_attention_pair(q, k, v, idx, counts, block_m=64, block_n=64, key_padding=kp)
        want, want_lse = reference.block_sparse_attention(q, k, v, idx, counts, **kw)
        torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol)
        for got, ref in zip(
            pair, reference.block_sparse_attention_pair(q, k, v, idx, counts, block_m=64, block_n=64, key_padding=kp)
        ):
            torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    assert all("kpad" in key[8] for key in auto.choices())


def test_calls_that_cannot_be_timed_take_the_fixed_default(monkeypatch):
    q, k, v, idx, counts = _inputs()
    kw = dict(block_m=64, block_n=64)
    q.requires_grad_(True)
    with kernels.use_backend("auto") as policy:
        out, _ = kernels.block_sparse_attention(q, k, v, idx, counts, **kw)  # needs gradients: no timing
    assert out.requires_grad and auto.counters() == {"untimed": 1} and list(policy.used.values()) == ["cpu"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as while Dynamo traces a direct call
    with kernels.use_backend("auto"), torch.no_grad():
        kernels.block_sparse_attention(q, k, v, idx, counts, **kw)
    assert auto.counters() == {"untimed": 2} and not auto.choices()


def test_precedence_config_over_environment_over_auto(monkeypatch):
    q, k, v, idx, counts = _inputs()
    kw = dict(block_m=64, block_n=64)
    assert kernels.requested() == "default" and kernels.backend_for("cpu") == "cpu"  # a direct call: not timed
    kernels.block_sparse_attention(q, k, v, idx, counts, **kw)
    assert not auto.choices()
    monkeypatch.setenv("DIT_ACCEL_KERNELS", "reference")
    with kernels.use_backend("auto"):
        assert kernels.requested() == "reference"  # the environment replaces auto
        kernels.block_sparse_attention(q, k, v, idx, counts, **kw)
    assert not auto.choices()
    with kernels.use_backend("cpu"):
        assert kernels.requested() == "cpu" and kernels.backend_for("cpu") == "cpu"  # an explicit config wins
    monkeypatch.setenv("DIT_ACCEL_KERNELS", "auto")
    assert kernels.requested() == "auto"
    kernels.block_sparse_attention(q, k, v, idx, counts, **kw)
    assert len(auto.choices()) == 1
    monkeypatch.setenv("DIT_ACCEL_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DIT_ACCEL_KERNELS='cuda'.*'auto', 'triton'"):
        kernels.requested()


def test_kernel_backend_option_is_validated():
    with pytest.raises(ValueError, match=r"kernel_backend='fast' is not allowed; choose one of 'auto', 'triton'"):
        dit_accel.AccelConfig(kernel_backend="fast")
    cfg = dit_accel.AccelConfig(kernel_backend="reference")
    assert cfg.kernel_backend == "reference" and cfg.to_dict()["kernel_backend"] == "reference"
    assert dit_accel.AccelConfig().kernel_backend == "auto"
    assert "kernel_backend" in cfg.explicit_fields and cfg.replace(sparsity=0.8).kernel_backend == "reference"
