"""The installed machinery: a state hook on each transformer and an interceptor at each self-attention site.

The transformer hook fills the denoising state before every forward. Each site hook runs the attention
module's own forward (projections, RoPE, QK-norm, LoRA stay stock) under a ``TorchFunctionMode`` that catches
its ``scaled_dot_product_attention`` call, so the same code serves processors that call SDPA directly
(CogVideoX, PixArt) and those going through diffusers' dispatcher with the native backend (Wan, LTX, Flux,
HunyuanVideo). Everything is per instance and removed by :meth:`Accelerator.remove`.

Under ``torch.compile`` Dynamo traces the hooks and the mode; the state work and each attention call then run
through the custom ops of :mod:`dit_accel.kernels.ops` (opaque nodes that run the same Python eagerly when the
graph executes), so the compiled transformer is one graph with no break and no guard on the step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, HookFunctionReference, StateManager
from torch.overrides import TorchFunctionMode

from .config import AccelConfig
from .core import CacheLedger, SiteCore, SiteEvent, SiteGroup, SiteStats
from .kernels import ops
from .methods import Method
from .parallel import describe, enter_forward
from .pipelines.families import Family
from .pipelines.token_order import ForwardOrder
from .schedule import all_steps_dense, dense_reason
from .state import StepTracker

__all__ = ["Accelerator", "CacheLedger", "SiteEvent", "SiteStats", "bind_sdpa", "remove_hook", "xformers_dense"]

STATE_HOOK = "dit_accel.state"
SITE_HOOK = "dit_accel.site"


class _ContextState(BaseState):
    """Placeholder state: the manager only exists so diffusers' ``cache_context`` reaches this hook."""

    def reset(self, *args: Any, **kwargs: Any) -> None:
        return None


class _StateHook(ModelHook):
    """Sets the denoising state before each transformer forward; reset at the end of each pipeline call."""

    _is_stateful = True

    def __init__(self, accelerator: Accelerator) -> None:
        super().__init__()
        self.accelerator = accelerator
        self.context = StateManager(_ContextState)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if torch.compiler.is_compiling():
            self.accelerator.compiled_begin(args, kwargs)
        else:
            self.accelerator.begin_forward(module, args, kwargs, self.context._context)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if torch.compiler.is_compiling():
            self.accelerator.compiled_end(output)
        else:
            self.accelerator.end_forward()
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.accelerator.new_generation()
        return module


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _SDPAInterceptor(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` calls made inside one attention module to its site."""

    def __init__(self, accelerator: Accelerator, site: SiteCore) -> None:
        super().__init__()
        self.accelerator = accelerator
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            if torch.compiler.is_compiling():
                return self.accelerator.compiled_attention(self.site, func, args, kwargs)
            return self.accelerator.attention(self.site, func, args, kwargs)
        if torch.compiler.is_compiling() and _is_python_tensor_method(func, args):
            # Dynamo cannot inline the Python-level Tensor methods (``unflatten``, ``split``...: their
            # ``super()`` call breaks the graph); called as a method it traces them as it does without a mode
            return getattr(args[0], func.__name__)(*args[1:], **kwargs)
        return func(*args, **kwargs)


def _is_python_tensor_method(func: Any, args: tuple) -> bool:
    """Whether ``func`` is a ``torch.Tensor`` method written in Python (``torch/_tensor.py``) called on a tensor."""
    name = getattr(func, "__name__", None)
    return (
        isinstance(name, str)
        and bool(args)
        and isinstance(args[0], torch.Tensor)
        and getattr(func, "__module__", None) == "torch._tensor"
        and getattr(torch.Tensor, name, None) is func
    )


class _SiteFunctionReference(HookFunctionReference):
    """The chain reference of one of our site hooks, robust to the removal of a hook registered below it.

    diffusers' ``HookRegistry.remove_hook`` relinks the next hook by setting its ``forward``; for a hook with
    ``new_forward`` (ours) that replaces the hook's own entry and bypasses it (after
    ``transformer.disable_cache()`` of a PyramidAttentionBroadcast or FasterCache hook installed before us, our
    interception would silently stop). Here that assignment goes to ``original_forward``, what ``new_forward``
    wraps. Only this instance's class changes (set on our own reference at install): nothing shared is patched.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and self.__dict__.get("forward") is not None:
            name = "original_forward"
        object.__setattr__(self, name, value)


class _SiteHook(ModelHook):
    def __init__(self, accelerator: Accelerator, site: SiteCore) -> None:
        super().__init__()
        self.accelerator = accelerator
        self.site = site

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with _SDPAInterceptor(self.accelerator, self.site):
            return self.fn_ref.original_forward(*args, **kwargs)


def bind_sdpa(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of an ``F.scaled_dot_product_attention`` call by name."""
    bound = dict(zip(_SDPA_ARGS, args))
    bound.update(kwargs)
    return bound


def square_mask_row(mask: Any) -> Any:
    """The first query row, (B, 1, 1, N), of a boolean (B, 1, N, N) mask a family builds as the outer product of a
    key padding with itself (``Family.square_padding_mask``); any other mask is returned as it is.

    A slice, so no host sync. The dense fallback still gets the full mask: the rows it hides (padded text queries)
    only ever feed padded text tokens, which every later call hides as keys, so the video output is the same.
    """
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1:
        if mask.shape[2] == mask.shape[3] > 1:
            return mask[:, :, :1, :]
    return mask


def xformers_dense(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Dense attention by xformers' memory-efficient kernel, or None when the call needs SDPA's features."""
    bound = bind_sdpa(args, kwargs)
    if bound.get("attn_mask") is not None or bound.get("dropout_p") or bound.get("is_causal"):
        return None
    q, k, v = bound["query"], bound["key"], bound["value"]
    if q.dim() != 4 or k.shape[1] != q.shape[1]:
        return None
    import xformers.ops as xops

    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=bound.get("scale")
    )
    return out.transpose(1, 2)


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor of a transformer's output (a tensor, a tuple, or a diffusers output dataclass)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = tuple(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Take hook ``name`` off ``module``, and the registry too when nothing else is left in it."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    above = None  # the hook registered right after ours: diffusers relinks it wrongly when it has new_forward
    if name in registry._hook_order:
        index = registry._hook_order.index(name)
        if index + 1 < len(registry._fn_refs):
            above = registry._fn_refs[index + 1]
    own_entry = above.forward if above is not None and above.original_forward is not None else None
    registry.remove_hook(name, recurse=False)
    if own_entry is not None and above.forward is not own_entry:
        # diffusers set ``forward`` (the hook's new_forward entry) to what lay below ours; the hook wraps
        # ``original_forward``, so that is where it belongs (a step cache installed after us keeps working)
        object.__setattr__(above, "original_forward", above.forward)
        object.__setattr__(above, "forward", own_entry)
    if registry.hooks:
        return
    del module._diffusers_hook
    forward = module.__dict__.get("forward")  # the registry left the class's forward bound on the instance
    if getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module:
        del module.forward


class Accelerator:
    """Everything installed on one transformer, and how to take it off again.

    The diffusers integration of the site core: the step and branch come from :class:`StepTracker` (cache
    context, scheduler timesteps), the calls are intercepted at ``F.scaled_dot_product_attention`` inside each
    self-attention module, and the dense fallback is the model's own call.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        family: Family,
        config: AccelConfig,
        scheduler: Any = None,
        ledger: CacheLedger | None = None,
    ):
        self.transformer = transformer
        self.family = family
        self.config = config
        self.group = SiteGroup(config, ledger=ledger, text_tokens=family.text_first is not None)
        self.tracker = StepTracker(
            scheduler=scheduler,
            num_steps_hint=config.num_steps,
            timestep_rises=family.timestep_rises,
            new_timesteps_new_generation=family.new_timesteps_new_generation,
        )
        self._installed = False
        self._state_hook: _StateHook | None = None
        self._op_id: int | None = None  # how the compile-path custom ops reach this accelerator
        self._token: torch.Tensor | None = None  # begin_forward's token in a compiled forward, for the sites
        self._ended: torch.Tensor | None = None  # end_forward's result: kept as a graph output, so never pruned
        self.forwards = 0  # transformer forwards since install
        self._steps: list[int] = []  # distinct step indices of the latest generation, in the order first seen
        self._steps_generation = -1
        self._seen: set[int] | None = None  # sites whose attention ran in the open forward (skipped = the rest)
        self._warned_all_dense = False
        #: the whole-forward tile order (``tile_permutation="per_forward"``), None with the per-call gather
        self.order: ForwardOrder | None = None
        if config.tile_permutation == "per_forward" and family.token_order is not None:
            self.order = ForwardOrder(transformer, family.token_order)

    @property
    def method(self) -> Method:
        return self.group.method

    @property
    def ledger(self) -> CacheLedger:
        """Cache bytes held now and their simultaneous peak, shared with the pipeline's other transformers."""
        return self.group.ledger

    @property
    def sites(self) -> list[SiteCore]:
        return self.group.sites

    @property
    def observers(self) -> list[Callable[[SiteEvent], None]]:
        """Callables receiving a :class:`SiteEvent` per attention call (the evaluator's probes and timers)."""
        return self.group.observers

    def install(self) -> None:
        sites = self.family.sites(self.transformer)
        if not sites:
            raise ValueError(
                f"{type(self.transformer).__name__} has no self-attention modules matching the {self.family.name} "
                "family's pattern; is this a modified model?"
            )
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        self._state_hook = _StateHook(self)
        registry.register_hook(self._state_hook, STATE_HOOK)
        self._op_id = ops.register_owner(self)
        for index, (name, module) in enumerate(sites):
            site = self.group.site(index, name, module)
            hook = _SiteHook(self, site)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, SITE_HOOK)
            hook.fn_ref.__class__ = _SiteFunctionReference  # survives the removal of a hook below it
        if self.order is not None:
            self.order.install()
        self._installed = True

    def remove(self) -> None:
        if not self._installed:
            return
        for site in self.sites:
            remove_hook(site.module, SITE_HOOK)
        if self.order is not None:
            self.order.remove()
        self.group.new_generation()
        remove_hook(self.transformer, STATE_HOOK)
        if self._op_id is not None:
            ops.unregister_owner(self._op_id)
        self._op_id = None
        self._state_hook = None
        self._token = None
        self._seen = None
        self._installed = False

    @property
    def installed(self) -> bool:
        return self._installed

    @torch.compiler.disable
    def attention(self, site: SiteCore, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        """One intercepted SDPA call, through the site core; the dense fallback is the call itself."""
        bound = bind_sdpa(args, kwargs)
        if self._seen is not None:
            self._seen.add(site.index)

        def dense() -> torch.Tensor:
            if self.config.dense_backend == "xformers":
                out = xformers_dense(args, kwargs)
                if out is not None:
                    return out
            return func(*args, **kwargs)

        mask = bound.get("attn_mask")
        if self.family.square_padding_mask:
            mask = square_mask_row(mask)
        return site.attend(
            bound.get("query"), bound.get("key"), bound.get("value"), state=self.tracker.state, dense=dense,
            scale=bound.get("scale"), attn_mask=mask, is_causal=bool(bound.get("is_causal")),
            dropout_p=bound.get("dropout_p") or 0.0, enable_gqa=bool(bound.get("enable_gqa")),
        )  # fmt: skip

    @torch.compiler.disable
    def begin_forward(
        self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], context: Any, compiled: bool = False
    ) -> None:
        enter_forward(module)  # refuses unsupported context parallelism; sets the Ulysses head group
        bound = self.family.bind(module, args, kwargs)
        layout = self.family.layout(module, bound)
        step_timestep = self.family.step_timestep
        timestep = step_timestep(bound) if step_timestep is not None else bound.get("timestep")
        if isinstance(timestep, torch.Tensor) and self.family.timestep_scale != 1.0:
            timestep = timestep * self.family.timestep_scale
        elif timestep is not None and not isinstance(timestep, torch.Tensor):
            timestep = float(timestep) * self.family.timestep_scale
        generation = self.tracker.state.generation
        state = self.tracker.begin(timestep, context, layout)
        if state.generation != generation:
            self.group.new_generation()
        self._note_step(state.generation, state.step)
        state.token_order = None if compiled else self._forward_order(module, bound, layout)
        self._seen = set()
        if not self._warned_all_dense:
            message = all_steps_dense(self.config, self.tracker.state.num_steps)
            if message is not None:
                self._warned_all_dense = True
                warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _forward_order(
        self, module: torch.nn.Module, bound: dict[str, Any], layout: Any
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The tile order this forward runs in (``tile_permutation="per_forward"``), or None: not asked for, no
        layout, context parallelism (its hooks split the raster sequence), or no site can be sparse in it (a dense
        step stays exactly the model's own)."""
        if self.order is None:
            return None
        self.order.begin(None, None)
        hidden = bound.get("hidden_states")
        if layout is None or not isinstance(hidden, torch.Tensor) or describe(module) is not None:
            return None
        n, state = layout.total_tokens, self.tracker.state
        if all(dense_reason(self.config, site.index, n, state) is not None for site in self.sites):
            return None
        order = self.method.forward_order(layout, n, hidden.device)
        if order is not None:
            self.order.begin(*order)
        return order

    def _note_step(self, generation: int, step: int) -> None:
        self.forwards += 1
        if generation != self._steps_generation:
            self._steps_generation, self._steps = generation, []
        if step not in self._steps:
            self._steps.append(step)

    @property
    def steps(self) -> tuple[int, ...]:
        """The global denoising steps this transformer ran in its latest generation (a Wan 2.2 expert runs only
        its share of them: the low-noise one starts at the boundary step, not 0)."""
        return tuple(self._steps)

    @torch.compiler.disable
    def end_forward(self) -> None:
        self.tracker.end()
        self.tracker.state.token_order = None
        if self.order is not None:
            self.order.end()
        self.group.end_forward()
        seen, self._seen = self._seen, None
        if seen is not None:  # a site that saw no call in this forward was skipped by a step cache
            for site in self.sites:
                if site.index not in seen:
                    site.stats.skipped_calls += 1

    # -- the compile path: traced by Dynamo, the work runs in dit_accel.kernels.ops ----------------------------
    def compiled_begin(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """``begin_forward`` inside a compiled region: the forward's tensors and numbers go to the op by name."""
        names: tuple[list[str], list[str], list[str]] = ([], [], [])
        values: tuple[list[torch.Tensor], list[int], list[float]] = ([], [], [])
        for name, value in [*((str(i), a) for i, a in enumerate(args)), *kwargs.items()]:
            if isinstance(value, torch.Tensor):
                names[0].append(name)
                values[0].append(value.detach())
            elif isinstance(value, bool):
                continue
            elif isinstance(value, int):
                names[1].append(name)
                values[1].append(value)
            elif isinstance(value, float):
                names[2].append(name)
                values[2].append(value)
        self._token = torch.ops.dit_accel.begin_forward(
            self._op_id, len(args), ",".join(names[0]), values[0], ",".join(names[1]), values[1], ",".join(names[2]),
            values[2],
        )  # fmt: skip

    def compiled_attention(
        self, site: SiteCore, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """One intercepted SDPA call inside a compiled region: one ``dit_accel::site_attention`` node."""
        bound = bind_sdpa(args, kwargs)
        q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v)):
            return self.attention(site, func, args, kwargs)  # the op has no backward: eager island, graph break
        return torch.ops.dit_accel.site_attention(
            self._token, q, k, v, bound.get("attn_mask"), float(bound.get("dropout_p") or 0.0),
            bool(bound.get("is_causal")), bound.get("scale"), bool(bound.get("enable_gqa")), self._op_id, site.index,
        )  # fmt: skip

    def compiled_end(self, output: Any) -> None:
        """``end_forward`` inside a compiled region, ordered after the output (so after every attention call)."""
        token = self._token
        if token is None:  # the forward began outside the compiled region
            self.end_forward()
            return
        anchor = _first_tensor(output)
        anchor = anchor.detach() if anchor is not None else None  # the op has no backward; order is all it needs
        self._ended = torch.ops.dit_accel.end_forward(self._op_id, token, anchor)
        self._token = None

    def begin_forward_from_op(self, args: tuple, kwargs: dict[str, Any]) -> None:
        assert self._state_hook is not None
        self.begin_forward(self.transformer, args, kwargs, self._state_hook.context._context, compiled=True)

    def attention_from_op(self, site: int, kwargs: dict[str, Any]) -> torch.Tensor:
        return self.attention(self.group.site(site), F.scaled_dot_product_attention, (), kwargs)

    def end_forward_from_op(self) -> None:
        self.end_forward()

    def new_generation(self) -> None:
        self.tracker.new_generation()
        self.group.new_generation()

    def stats(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "transformer": type(self.transformer).__name__,
            **self.group.stats(),
        }
