"""Which attention backend is asked for: the ``kernel_backend`` option, ``DIT_ACCEL_KERNELS``, or the default.

Precedence, from strongest:

1. an explicit ``kernel_backend`` (anything but ``"auto"``) of the config whose call this is (set by the site core
   around a method's kernel calls through :func:`use_backend`);
2. ``DIT_ACCEL_KERNELS=<backend>``: a process-wide override (tests and scripts force ``triton`` or ``reference``
   through it without touching configs); ``DIT_ACCEL_KERNELS=auto`` asks for the timed choice everywhere;
3. ``kernel_backend="auto"`` (the config default): the timed choice (:mod:`dit_accel.kernels.auto`);
4. a kernel called outside any accelerated call with no environment variable: the fixed device default (Triton
   on CUDA, the fused CPU kernels on the CPU, the reference elsewhere), so direct calls stay deterministic.

A context variable carries the choice, so the kernels' signatures do not change and a call under
``torch.compile`` (which runs the methods inside an opaque custom op, eagerly) sees it the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

__all__ = ["BACKENDS", "KernelPolicy", "check_backend", "current_policy", "requested", "use_backend"]

#: the values of ``kernel_backend`` and ``DIT_ACCEL_KERNELS``
BACKENDS = ("auto", "triton", "flex", "fa4", "flex_flash", "cudnn_bsa", "cpu", "reference")


def check_backend(value: object, name: str = "kernel_backend") -> str:
    """``value`` if it names a backend, else ``ValueError`` naming ``name`` and the allowed values."""
    if not isinstance(value, str) or value not in BACKENDS:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, BACKENDS))}")
    return value


@dataclass
class KernelPolicy:
    """The ``kernel_backend`` of one site group, and what ``auto`` chose for the calls it made (the call's key ->
    backend; ``handle.stats()`` labels the keys), without formatting anything per call."""

    backend: str = "auto"
    used: dict[tuple, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_backend(self.backend)


_POLICY: ContextVar[KernelPolicy | None] = ContextVar("dit_accel_kernel_policy", default=None)


@contextlib.contextmanager
def use_backend(policy: KernelPolicy | str) -> Iterator[KernelPolicy]:
    """Run the block inside with ``policy`` (or a backend name) as the calling config's ``kernel_backend``."""
    if isinstance(policy, str):
        policy = KernelPolicy(policy)
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def current_policy() -> KernelPolicy | None:
    """The policy of the accelerated call in progress, or None outside one."""
    return _POLICY.get()


def env_backend() -> str | None:
    """``DIT_ACCEL_KERNELS`` when set (validated), else None."""
    raw = os.environ.get("DIT_ACCEL_KERNELS", "").strip().lower()
    return check_backend(raw, "DIT_ACCEL_KERNELS") if raw else None


def requested() -> str:
    """The backend asked for right now, by the precedence above: a backend name, ``"auto"`` (time the candidates)
    or ``"default"`` (the fixed device default)."""
    policy = _POLICY.get()
    if policy is not None and policy.backend != "auto":
        return policy.backend
    env = env_backend()
    if env is not None:
        return env
    return "auto" if policy is not None else "default"
