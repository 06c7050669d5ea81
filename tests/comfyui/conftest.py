"""Stand-in ``comfy`` / ``comfy_api`` modules (ComfyUI is not on PyPI), installed into sys.modules per test.

They reproduce the surfaces the node touches as ComfyUI 0.8.0 behaves (checked against its source; re-written here,
not copied: ComfyUI is GPL):

* ``ModelPatcher`` (comfy/model_patcher.py): ``clone()`` deep-copies ``model_options`` (so functions and bound
  objects inside are shared by reference, as ``copy.deepcopy`` does), copies ``object_patches`` and the keyed
  callback / wrapper lists; ``get_model_object`` honours ``object_patches`` before the model's attribute;
  ``prepare_state(timestep)`` calls every ON_PREPARE_STATE callback as ``callback(patcher, timestep)`` (no
  model_options); ``cleanup()`` calls ON_CLEANUP callbacks as ``callback(patcher)``.
* sampling (comfy/samplers.py ``CFGGuider.sample`` / ``outer_sample`` / ``inner_sample`` / ``_calc_cond_batch``,
  comfy/sampler_helpers.py ``prepare_model_patcher``): the run works on nested copies of the patcher's
  model_options (``copy_nested_dicts``), the patcher's wrappers and callbacks are merged into
  ``transformer_options["wrappers"/"callbacks"]``, ``sample_sigmas`` is the schedule tensor, each step calls
  ``current_patcher.prepare_state(sigma)`` and then the model once per batch chunk with a fresh
  ``transformer_options`` (merged from the run's) holding ``cond_or_uncond``, ``uuids`` and ``sigmas`` (the
  float32 sigma tensor of shape [batch]); ``cleanup()`` runs at the end.
* ``WanModel.forward`` (comfy/ldm/wan/model.py): runs ``_forward`` through the DIFFUSION_MODEL wrappers found in
  ``transformer_options["wrappers"]``, the executor's ``class_obj`` being the model, with the arguments
  ``(x, timestep, context, clip_fea, time_dim_concat, transformer_options)`` positionally; the block loop sets
  ``transformer_options["block_index"]`` (ComfyUI >= 0.5) and every attention gets ``transformer_options=...``.
* ``wrap_attn`` (comfy/ldm/modules/attention.py): outside an override it marks ``kwargs["_inside_attn_wrapper"]``
  and hands the call to ``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` where
  ``func`` is the unwrapped attention; the mark is removed afterwards.
* ``ModelSamplingDiscreteFlow.percent_to_sigma`` (comfy/model_sampling.py): 1.0 at percent <= 0, 0.0 at >= 1,
  else ``time_snr_shift(shift, 1 - percent)`` in Python floats; the ModelSamplingSD3 node
  (comfy_extras/nodes_model_advanced.py) clones the model and ``add_object_patch("model_sampling", ...)``.
* prompt validation (execution.py ``validate_inputs``): V1 ``VALIDATE_INPUTS`` / V3 ``validate_inputs`` get the
  inputs named in their signature; ComfyUI's own min/max checks are skipped for those; a result other than True
  becomes an error ``"<input> - <message>"`` for each input passed.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import sys
import types
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

OVERRIDE = "optimized_attention_override"


class CallbacksMP:
    ON_CLONE = "on_clone"
    ON_PRE_RUN = "on_pre_run"
    ON_PREPARE_STATE = "on_prepare_state"
    ON_CLEANUP = "on_cleanup"


class WrappersMP:
    DIFFUSION_MODEL = "diffusion_model"


class WrapperExecutor:
    """Calls the wrappers in order, each as ``wrapper(next_executor, *args, **kwargs)``, then the original."""

    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, list(wrappers), idx

    def __call__(self, *args, **kwargs):
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


def get_all_wrappers(wrapper_type: str, transformer_options: dict) -> list:
    """Every wrapper of a type held in ``transformer_options["wrappers"]`` (key order, then list order)."""
    return [fn for fns in transformer_options.get("wrappers", {}).get(wrapper_type, {}).values() for fn in fns]


def copy_nested_dicts(d: dict) -> dict:
    """A copy whose nested dicts are copied too and lists shallow-copied; other values are shared."""
    out = dict(d)
    for key, value in d.items():
        if isinstance(value, dict):
            out[key] = copy_nested_dicts(value)
        elif isinstance(value, list):
            out[key] = list(value)
    return out


def merge_nested_dicts(base: dict, extra: dict) -> dict:
    """``base`` (modified) updated by ``extra``: dicts merge recursively into copies, lists extend."""
    for key, value in extra.items():
        if isinstance(value, dict):
            base[key] = merge_nested_dicts(copy_nested_dicts(base.get(key, {})), value)
        elif isinstance(value, list):
            base.setdefault(key, []).extend(value)
        else:
            base[key] = value
    return base


def time_snr_shift(alpha: float, t: float) -> float:
    return t if alpha == 1.0 else alpha * t / (1 + (alpha - 1) * t)


class ModelSamplingFlow:
    """``ModelSamplingDiscreteFlow``'s percent_to_sigma (Wan, SD3, ...)."""

    def __init__(self, shift: float = 1.0) -> None:
        self.shift = shift

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return time_snr_shift(self.shift, 1.0 - percent)

    def schedule(self, steps: int) -> list[float]:
        """Sigmas of ``steps`` evenly spaced steps (as float32 tensors hold them), ending at 0."""
        return [float(torch.tensor(time_snr_shift(self.shift, 1 - i / steps))) for i in range(steps)] + [0.0]


class ModelPatcher:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.object_patches: dict[str, Any] = {}
        self.wrappers: dict[str, dict[str, list]] = {}
        self.callbacks: dict[str, dict[str, list]] = {}

    def clone(self) -> ModelPatcher:
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.object_patches = dict(self.object_patches)
        n.wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in self.wrappers.items()}
        n.callbacks = {t: {k: list(v) for k, v in d.items()} for t, d in self.callbacks.items()}
        for cb in self.get_all_callbacks(CallbacksMP.ON_CLONE):
            cb(self, n)
        return n

    def add_object_patch(self, name: str, obj: Any) -> None:
        self.object_patches[name] = obj

    def get_model_object(self, name: str) -> Any:
        if name in self.object_patches:
            return self.object_patches[name]
        return functools.reduce(getattr, name.split("."), self.model)

    def add_wrapper_with_key(self, wrapper_type: str, key: str, fn) -> None:
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(fn)

    def add_callback_with_key(self, call_type: str, key: str, fn) -> None:
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(fn)

    def get_all_callbacks(self, call_type: str) -> list:
        return [fn for fns in self.callbacks.get(call_type, {}).values() for fn in fns]

    def pre_run(self) -> None:
        self.model.current_patcher = self
        for cb in self.get_all_callbacks(CallbacksMP.ON_PRE_RUN):
            cb(self)

    def prepare_state(self, timestep) -> None:
        for cb in self.get_all_callbacks(CallbacksMP.ON_PREPARE_STATE):
            cb(self, timestep)

    def cleanup(self) -> None:
        self.model.current_patcher = None
        for cb in self.get_all_callbacks(CallbacksMP.ON_CLEANUP):
            cb(self)


def model_sampling_sd3(model: ModelPatcher, shift: float) -> ModelPatcher:
    """The ModelSamplingSD3 node: a clone whose model_sampling is an object patch with ``shift``."""
    m = model.clone()
    m.add_object_patch("model_sampling", ModelSamplingFlow(shift))
    return m


def wrap_attn(func):
    """The override hook ComfyUI puts on every attention backend (behaviour of comfy's ``wrap_attn``)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if "_inside_attn_wrapper" in kwargs:
            return func(*args, **kwargs)
        kwargs["_inside_attn_wrapper"] = True
        try:
            options = kwargs.get("transformer_options")
            if options is not None and OVERRIDE in options:
                return options[OVERRIDE](func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            kwargs.pop("_inside_attn_wrapper", None)

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
    ``optimized_attention`` with ``transformer_options``; ``forward`` runs the DIFFUSION_MODEL wrappers of
    ``transformer_options`` like WanModel.forward. ``block_info=False`` models ComfyUI < 0.5 (no block_index)."""

    patch_size = (1, 2, 2)

    def __init__(
        self, channels: int = 4, heads: int = 2, dim_head: int = 16, blocks: int = 2, *, block_info: bool = True
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        dim = heads * dim_head
        self.heads = heads
        self.block_info = block_info
        self.embed = torch.nn.Linear(channels * 4, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(blocks))
        self.cross_q = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(blocks))
        self.head = torch.nn.Linear(dim, channels * 4)
        self.model_sampling = ModelSamplingFlow()
        self.current_patcher: ModelPatcher | None = None

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):  # noqa: B006
        wrappers = get_all_wrappers(WrappersMP.DIFFUSION_MODEL, transformer_options)
        executor = WrapperExecutor(self._forward, self, wrappers)
        return executor.execute(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):  # noqa: B006
        b, c, f, h, w = x.shape
        tokens = x.view(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, -1, c * 4)
        hidden = self.embed(tokens)
        attention = sys.modules["comfy.ldm.modules.attention"].optimized_attention
        transformer_options["total_blocks"] = len(self.qkv)
        for i, (qkv, cq) in enumerate(zip(self.qkv, self.cross_q)):
            if self.block_info:
                transformer_options["block_index"] = i
            q, k, v = qkv(hidden).chunk(3, dim=-1)
            hidden = hidden + attention(q, k, v, self.heads, transformer_options=transformer_options)
            hidden = hidden + attention(
                cq(hidden), context, context, self.heads, transformer_options=transformer_options
            )
        out = self.head(hidden).view(b, f, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
        return out.reshape(b, c, f, h, w)


def sample(
    patcher: ModelPatcher, sigmas: list[float], *, frames: int = 2, size: int = 16, cfg: bool = False
) -> torch.Tensor:
    """A tiny Euler sampler that calls the model the way ComfyUI 0.8.0's samplers do (see the module docstring)."""
    model = patcher.model
    options = copy_nested_dicts(patcher.model_options)  # CFGGuider.sample
    to = options.setdefault("transformer_options", {})
    merge_nested_dicts(to.setdefault("wrappers", {}), patcher.wrappers)  # prepare_model_patcher
    merge_nested_dicts(to.setdefault("callbacks", {}), patcher.callbacks)
    schedule = torch.tensor(sigmas, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, frames, size, size, generator=g)
    context = torch.randn(1, 8, 32, generator=g)
    patcher.pre_run()
    try:
        run = copy_nested_dicts(options)  # inner_sample
        run["transformer_options"]["sample_sigmas"] = schedule
        for i in range(len(sigmas) - 1):
            sigma = schedule[i] * x.new_ones([x.shape[0]])  # k-diffusion: sigmas[i] * s_in
            model.current_patcher.prepare_state(sigma)  # _calc_cond_batch
            outs = []
            for chunk in ([0], [1]) if cfg else ([0],):
                batch_options = merge_nested_dicts({}, run["transformer_options"])
                batch_options["cond_or_uncond"] = list(chunk)
                batch_options["uuids"] = [f"uuid{c}" for c in chunk]
                batch_options["sigmas"] = sigma
                outs.append(model(x, sigma, context, transformer_options=batch_options))
            out = outs[0] if not cfg else outs[1] + 2.0 * (outs[0] - outs[1])
            x = x + (schedule[i + 1] - schedule[i]) * out
    finally:
        patcher.cleanup()
    return x


def validate(node_cls: type, inputs: dict[str, Any], *, v3: bool = False) -> list[dict[str, str]]:
    """Prompt validation of one node as execution.validate_inputs does it; the errors ComfyUI would report."""
    if v3:
        schema = node_cls.define_schema()
        limits = {i.id: i.kwargs for i in schema.inputs}
        fn = node_cls.validate_inputs if "validate_inputs" in vars(node_cls) else None
    else:
        limits = {name: (spec[1] if len(spec) > 1 else {}) for name, spec in node_cls.INPUT_TYPES()["required"].items()}
        fn = getattr(node_cls, "VALIDATE_INPUTS", None)
    spec = inspect.getfullargspec(fn) if fn is not None else None
    takes = set(spec.args) if spec is not None else set()
    takes_all = spec is not None and spec.varkw is not None
    errors = []
    for name, value in inputs.items():
        if name in takes or takes_all:
            continue
        info = limits.get(name, {})
        if isinstance(info, dict) and "min" in info and value < info["min"]:
            errors.append({"type": "value_smaller_than_min", "details": name})
        elif isinstance(info, dict) and "max" in info and value > info["max"]:
            errors.append({"type": "value_bigger_than_max", "details": name})
    if fn is not None and (takes or takes_all):
        passed = {k: v for k, v in inputs.items() if k in takes or takes_all}
        result = fn(**passed)
        if result is not True:
            for name in passed:
                details = name if result is False else f"{name} - {result}"
                errors.append({"type": "custom_validation_failed", "details": details})
    return errors


def _io_module() -> types.ModuleType:
    io = types.ModuleType("comfy_api.latest.io")

    class _Input:
        def __init__(self, id: str, **kwargs: Any) -> None:
            self.id, self.kwargs = id, kwargs

    def _kind(name: str) -> type:
        return type(name, (), {"Input": _Input, "Output": staticmethod(lambda *a, **k: (name, a, k))})

    for name in ("Model", "Float", "Int", "String", "Combo", "Boolean"):
        setattr(io, name, _kind(name))

    class ComfyNode:
        @classmethod
        def validate_inputs(cls, **kwargs: Any) -> bool | str:  # the placeholder ComfyUI ignores
            raise NotImplementedError

    io.Schema = lambda **kwargs: SimpleNamespace(**kwargs)
    io.NodeOutput = lambda *values: SimpleNamespace(result=values)
    io.ComfyNode = ComfyNode
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
        ModelSamplingFlow=ModelSamplingFlow,
        model_sampling_sd3=model_sampling_sd3,
        sample=sample,
        validate=validate,
        attention=attention_pytorch,
        CallbacksMP=CallbacksMP,
        WrapperExecutor=WrapperExecutor,
    )
