"""Stand-in ``comfy`` / ``comfy_api`` modules (ComfyUI is not on PyPI), installed into sys.modules per test.

They reproduce just the surfaces the node touches: ``ModelPatcher`` (clone deep-copies model_options, keyed
wrappers and callbacks), ``patcher_extension`` enums and wrapper executors, ``wrap_attn`` copied from
comfy/ldm/modules/attention.py, and the V3 ``io`` schema classes.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import sys
import types
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F


class CallbacksMP:
    ON_CLONE = "on_clone"
    ON_PREPARE_STATE = "on_prepare_state"
    ON_CLEANUP = "on_cleanup"


class WrappersMP:
    DIFFUSION_MODEL = "diffusion_model"


class WrapperExecutor:
    """Calls the wrappers in order, each with the next executor, then the original function."""

    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, wrappers, idx

    def __call__(self, *args, **kwargs):
        if self.idx < len(self.wrappers):
            nxt = WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1)
            return self.wrappers[self.idx](nxt, *args, **kwargs)
        return self.original(*args, **kwargs)


class ModelSampling:
    """Sigma = 1 - percent, with ComfyUI's special ends."""

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return 1.0 - percent


class ModelPatcher:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.wrappers: dict[str, dict[str, list]] = {}
        self.callbacks: dict[str, dict[str, list]] = {}

    def clone(self) -> ModelPatcher:
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in self.wrappers.items()}
        n.callbacks = {t: {k: list(v) for k, v in d.items()} for t, d in self.callbacks.items()}
        return n

    def add_wrapper_with_key(self, wrapper_type: str, key: str, fn) -> None:
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(fn)

    def add_callback_with_key(self, call_type: str, key: str, fn) -> None:
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(fn)

    def get_all_wrappers(self, wrapper_type: str) -> list:
        return [fn for fns in self.wrappers.get(wrapper_type, {}).values() for fn in fns]

    def get_all_callbacks(self, call_type: str) -> list:
        return [fn for fns in self.callbacks.get(call_type, {}).values() for fn in fns]

    def get_model_object(self, name: str) -> Any:
        return getattr(self.model, name)

    def prepare_state(self, timestep, model_options) -> None:
        for cb in self.get_all_callbacks(CallbacksMP.ON_PREPARE_STATE):
            cb(self, timestep, model_options)

    def cleanup(self) -> None:
        for cb in self.get_all_callbacks(CallbacksMP.ON_CLEANUP):
            cb(self)


def wrap_attn(func):
    # copied from comfy/ldm/modules/attention.py
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        remove_attn_wrapper_key = False
        try:
            if "_inside_attn_wrapper" not in kwargs:
                transformer_options = kwargs.get("transformer_options", None)
                remove_attn_wrapper_key = True
                kwargs["_inside_attn_wrapper"] = True
                if transformer_options is not None:
                    if "optimized_attention_override" in transformer_options:
                        return transformer_options["optimized_attention_override"](func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            if remove_attn_wrapper_key:
                del kwargs["_inside_attn_wrapper"]

    return wrapper


@wrap_attn
def attention_pytorch(
    q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs
):
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


class FakeWan(torch.nn.Module):
    """Wan-like DiT: patchify (1, 2, 2), per block self-attention then cross-attention, both via
    ``optimized_attention`` with ``transformer_options``; ``forward`` runs the DIFFUSION_MODEL wrappers."""

    patch_size = (1, 2, 2)

    def __init__(self, channels: int = 4, heads: int = 2, dim_head: int = 16, blocks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        dim = heads * dim_head
        self.heads = heads
        self.embed = torch.nn.Linear(channels * 4, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(blocks))
        self.cross_q = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(blocks))
        self.model_sampling = ModelSampling()
        self.patcher: ModelPatcher | None = None

    def forward(self, x, timestep, context, transformer_options):
        wrappers = self.patcher.get_all_wrappers(WrappersMP.DIFFUSION_MODEL) if self.patcher else []
        return WrapperExecutor(self._forward, self, wrappers)(x, timestep, context, transformer_options)

    def _forward(self, x, timestep, context, transformer_options):
        b, c, f, h, w = x.shape
        tokens = x.view(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, -1, c * 4)
        hidden = self.embed(tokens)
        attention = sys.modules["comfy.ldm.modules.attention"].optimized_attention
        for qkv, cq in zip(self.qkv, self.cross_q):
            q, k, v = qkv(hidden).chunk(3, dim=-1)
            hidden = hidden + attention(q, k, v, self.heads, transformer_options=transformer_options)
            hidden = hidden + attention(
                cq(hidden), context, context, self.heads, transformer_options=transformer_options
            )
        return hidden


def sample(patcher: ModelPatcher, sigmas: list[float], *, frames: int = 2, size: int = 16) -> torch.Tensor:
    """A tiny stand-in for ComfyUI's sampler: sets sigmas / sample_sigmas / cond_or_uncond like calc_cond_batch."""
    model = patcher.model
    model.patcher = patcher
    options = copy.copy(patcher.model_options)
    options["transformer_options"] = dict(patcher.model_options["transformer_options"])
    schedule = torch.tensor(sigmas)
    options["transformer_options"]["sample_sigmas"] = schedule
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, frames, size, size, generator=g)
    context = torch.randn(1, 8, 32, generator=g)
    out = None
    for sigma in schedule[:-1]:
        patcher.prepare_state(sigma, options)
        to = options["transformer_options"]
        to["sigmas"] = sigma.reshape(1)
        to["cond_or_uncond"] = [0]
        out = model(x, sigma, context, to)
    patcher.cleanup()
    return out


def _io_module() -> types.ModuleType:
    io = types.ModuleType("comfy_api.latest.io")

    class _Input:
        def __init__(self, id: str, **kwargs: Any) -> None:
            self.id, self.kwargs = id, kwargs

    def _kind(name: str) -> type:
        return type(name, (), {"Input": _Input, "Output": staticmethod(lambda *a, **k: (name, a, k))})

    for name in ("Model", "Float", "Int", "String", "Combo", "Boolean"):
        setattr(io, name, _kind(name))
    io.Schema = lambda **kwargs: SimpleNamespace(**kwargs)
    io.NodeOutput = lambda *values: SimpleNamespace(result=values)
    io.ComfyNode = type("ComfyNode", (), {})
    return io


@pytest.fixture
def comfy(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Install the stand-ins and (re)import the node module against them."""

    def module(name: str, package: bool = False, **attrs: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        if package:
            mod.__path__ = []
        for key, value in attrs.items():
            setattr(mod, key, value)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    module("comfy", package=True)
    module("comfy.patcher_extension", CallbacksMP=CallbacksMP, WrappersMP=WrappersMP, WrapperExecutor=WrapperExecutor)
    module("comfy.model_patcher", ModelPatcher=ModelPatcher)
    module("comfy.ldm", package=True)
    module("comfy.ldm.modules", package=True)
    module("comfy.ldm.modules.attention", wrap_attn=wrap_attn, optimized_attention=attention_pytorch)
    module("comfy_api", package=True)
    io = _io_module()
    monkeypatch.setitem(sys.modules, "comfy_api.latest.io", io)

    class ComfyExtension:
        async def get_node_list(self) -> list:
            return []

    module("comfy_api.latest", package=True, io=io, ComfyExtension=ComfyExtension)
    node = importlib.import_module("dit_accel.pipelines.comfyui.node")
    package = importlib.import_module("dit_accel.pipelines.comfyui")
    return SimpleNamespace(
        node=node,
        package=package,
        ModelPatcher=ModelPatcher,
        FakeWan=FakeWan,
        sample=sample,
        attention=attention_pytorch,
        CallbacksMP=CallbacksMP,
        math=math,
    )
