"""``torch.library`` custom ops that make an accelerated transformer one graph under ``torch.compile``.

The step, the schedule and every dense/sparse decision are Python state that changes each step; traced by Dynamo
they would become guards (a recompile per step) or graph breaks. Instead, a compiled forward calls three opaque
ops, each running the Python machinery eagerly when the graph executes:

* ``dit_accel::begin_forward``: the transformer's tensor and number arguments in; sets the denoising state
  (step, branch, token layout) exactly as the eager hook does; returns an empty token.
* ``dit_accel::site_attention``: one intercepted SDPA call of one site (the dense decision, the cached pattern and
  statistics, the kernel, the compensation, the stats); takes the token, so it runs after ``begin_forward``.
* ``dit_accel::end_forward``: takes the token and a tensor of the transformer's output, so it runs after every
  attention call; ends the forward (one drift read at most, as eagerly).

The ops reach their Python owner (a :class:`dit_accel.runtime.Accelerator`) through an int id into a registry of
weak references (custom ops take tensors and numbers only), so a dropped pipeline is not kept alive by it. Their
fake implementations only give the output's shape, dtype, device and strides.
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from typing import Any, Protocol

import torch

__all__ = [
    "OpOwner",
    "begin_forward",
    "end_forward",
    "lookup_owner",
    "register_owner",
    "site_attention",
    "site_attention_layout",
    "unregister_owner",
]


class OpOwner(Protocol):
    """What the ops call back into, eagerly, while the compiled graph runs."""

    def begin_forward_from_op(self, args: tuple, kwargs: dict[str, Any]) -> None: ...

    def attention_from_op(self, site: int, kwargs: dict[str, Any]) -> torch.Tensor: ...

    def end_forward_from_op(self) -> None: ...


_OWNERS: dict[int, weakref.ref] = {}
_IDS = itertools.count(1)


def register_owner(owner: OpOwner) -> int:
    """A new id by which the ops reach ``owner`` (held weakly)."""
    key = next(_IDS)
    _OWNERS[key] = weakref.ref(owner)
    return key


def unregister_owner(key: int) -> None:
    """Forget ``key``: an op still naming it (a stale compiled graph) raises instead of running."""
    _OWNERS.pop(key, None)


def lookup_owner(key: int) -> OpOwner:
    ref = _OWNERS.get(key)
    owner = ref() if ref is not None else None
    if owner is None:
        raise RuntimeError(
            f"dit_accel op called for owner {key}, which was removed (handle.remove() or garbage-collected); "
            "this compiled graph belongs to an accelerated transformer that no longer exists: call "
            "torch._dynamo.reset() or compile the transformer again"
        )
    return owner


def _tags() -> dict[str, Any]:
    """Mark the ops unsafe for CUDA graphs where torch knows the tag: a replayed graph skips their Python."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None or "tags" not in inspect.signature(torch.library.custom_op).parameters:
        return {}
    return {"tags": (tag,)}


def _token_like(tensors: list[torch.Tensor]) -> torch.Tensor:
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty(0, device=device)


@torch.library.custom_op("dit_accel::begin_forward", mutates_args=(), **_tags())
def begin_forward(
    owner: int,
    num_args: int,
    tensor_names: str,
    tensors: list[torch.Tensor],
    int_names: str,
    ints: list[int],
    float_names: str,
    floats: list[float],
) -> torch.Tensor:
    """Start one transformer forward. ``*_names`` are comma-separated (custom ops take no list of strings): a
    position (``"0"``, ``"1"``, ...) or a keyword per value; positional arguments that are neither tensors nor
    numbers come back as None."""
    args: list[Any] = [None] * num_args
    kwargs: dict[str, Any] = {}
    for names, values in ((tensor_names, tensors), (int_names, ints), (float_names, floats)):
        for name, value in zip(names.split(",") if names else (), values):
            if name.isdigit():
                args[int(name)] = value
            else:
                kwargs[name] = value
    lookup_owner(owner).begin_forward_from_op(tuple(args), kwargs)
    return _token_like(tensors)


@begin_forward.register_fake
def _(owner, num_args, tensor_names, tensors, int_names, ints, float_names, floats):
    return _token_like(tensors)


def site_attention_layout(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like SDPA's output (query's shape with value's last size), laid out in memory like
    the query (SDPA's own choice on CPU and for the usual CUDA backends, so the real output rarely needs a copy)."""
    shape = (*query.shape[:-1], value.shape[-1])
    order = sorted(range(query.dim()), key=lambda d: (-query.stride(d), d))  # outermost first
    physical = torch.empty([shape[d] for d in order], dtype=query.dtype, device=query.device)
    return physical.permute([order.index(d) for d in range(query.dim())])


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and all(s == 1 or x == y for s, x, y in zip(a.shape, a.stride(), b.stride()))


@torch.library.custom_op("dit_accel::site_attention", mutates_args=(), **_tags())
def site_attention(
    token: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    owner: int,
    site: int,
) -> torch.Tensor:
    """One ``F.scaled_dot_product_attention`` call of site ``site``, dense or sparse as the site decides."""
    call = dict(
        query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
        scale=scale, enable_gqa=enable_gqa,
    )  # fmt: skip
    out = lookup_owner(owner).attention_from_op(site, call)
    like = site_attention_layout(query, value)
    if out.dtype != like.dtype or not _same_layout(out, like):
        like.copy_(out)  # the fake promised this layout; a custom op may not return an input or a view of it either
        return like
    if any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in (query, key, value)):
        return out.clone(memory_format=torch.preserve_format)
    return out


@site_attention.register_fake
def _(token, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, owner, site):
    return site_attention_layout(query, value)


@torch.library.custom_op("dit_accel::end_forward", mutates_args=(), **_tags())
def end_forward(owner: int, token: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
    """End the forward ``token`` began; ``anchor`` (a tensor of the transformer's output) orders it last."""
    lookup_owner(owner).end_forward_from_op()
    return torch.empty(0, device=token.device)


@end_forward.register_fake
def _(owner, token, anchor):
    return torch.empty(0, device=token.device)
