"""``accelerate(pipe)``: install step-aware sparse attention on a diffusers pipeline, and take it off again."""

from __future__ import annotations

import importlib.util
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from .config import ALLOWED, AccelConfig, resolve_config
from .kernels import auto_choices, backend_for, use_backend
from .kernels.auto import key_label
from .parallel import check_context_parallel, describe
from .pipelines.families import find_family
from .runtime import Accelerator, CacheLedger, SiteStats

__all__ = ["AccelHandle", "accelerate"]

_ATTR = "_dit_accel_accelerator"


class AccelHandle:
    """What :func:`accelerate` installed. ``remove()`` undoes it; usable as a context manager."""

    def __init__(self, config: AccelConfig, accelerators: dict[str, Accelerator]) -> None:
        self.config = config
        self._accelerators = accelerators

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def accelerators(self) -> dict[str, Accelerator]:
        """What was installed per transformer component (sites, observers, the method object)."""
        return dict(self._accelerators)

    @property
    def active(self) -> bool:
        return any(acc.installed for acc in self._accelerators.values())

    def remove(self) -> None:
        """Remove every hook; afterwards the pipeline computes exactly as if never accelerated."""
        for acc in self._accelerators.values():
            acc.remove()
            if getattr(acc.transformer, _ATTR, None) is acc:
                delattr(acc.transformer, _ATTR)

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable counters: per site and overall dense/sparse calls, reasons, density, cache bytes."""
        overall = SiteStats()
        sites: dict[str, Any] = {}
        cache_total = 0
        families = {}
        per_transformer: dict[str, Any] = {}
        for component, acc in self._accelerators.items():
            families[component] = acc.family.name
            mine, mine_cache = SiteStats(), 0
            for site in acc.sites:
                overall.add(site.stats)
                mine.add(site.stats)
                cache = site.cache_bytes()
                cache_total += cache
                mine_cache += cache
                sites[f"{component}.{site.name}"] = site.stats.as_dict(cache)
            # each expert apart (Wan 2.2): its own counters, the options it runs, the steps it ran
            per_transformer[component] = {
                "family": acc.family.name,
                "class": type(acc.transformer).__name__,
                "overall": mine.as_dict(mine_cache),
                "forwards": acc.forwards,
                "steps": list(acc.steps),
                "config": acc.config.to_dict(),
            }
        first = next(iter(self._accelerators.values()))
        totals = overall.as_dict(cache_total)
        totals["cache_bytes_peak"] = first.ledger.peak  # one ledger for all: the true simultaneous peak
        device = first.transformer
        param = next(device.parameters(), None)
        return {
            "method": self.config.method,
            "config": self.config.to_dict(),
            "families": families,
            # what each transformer runs: the config's schedule, or its preset's schedule for that family
            "schedules": {
                component: acc.config.to_dict(nested=True)["schedule"] for component, acc in self._accelerators.items()
            },
            "kernel_backend": self._kernel_backend(param.device if param is not None else torch.device("cpu")),
            # what kernel_backend="auto" chose per call key (shape, dtype, blocks, density bucket, LSE, features),
            # with the seconds of each timed candidate and the ones excluded by the check against the reference
            "kernel_choices": self._kernel_choices(),
            "overall": totals,
            "steps_backwards": sum(acc.tracker.steps_backwards for acc in self._accelerators.values()),
            "transformers": per_transformer,
            "sites": sites,
            "context_parallel": describe(device),  # None single-process; else stats are this rank's heads
        }

    def _kernel_backend(self, device: torch.device) -> str:
        """One name for the kernels the sparse calls ran: the forced backend, the one ``auto`` chose everywhere,
        ``auto(a,b)`` when it chose several, or ``auto`` before any sparse call."""
        names: set[str] = set()
        for acc in self._accelerators.values():
            policy = acc.group.kernel_policy
            with use_backend(policy):
                forced = policy.backend != "auto" or not _times(device)
                if forced:
                    names.add(backend_for(device))
                else:
                    names.update(policy.used.values())
        if len(names) == 1:
            return names.pop()
        return f"auto({','.join(sorted(names))})" if names else "auto"

    def _kernel_choices(self) -> dict[str, Any]:
        table = auto_choices()
        used: dict[str, str] = {}
        for acc in self._accelerators.values():
            used.update((key_label(key), backend) for key, backend in acc.group.kernel_policy.used.items())
        return {label: table.get(label, {"backend": backend}) for label, backend in sorted(used.items())}

    def __enter__(self) -> AccelHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}={acc.family.name}" for name, acc in self._accelerators.items())
        return f"AccelHandle(method={self.config.method!r}, {parts}, active={self.active})"


def _times(device: torch.device) -> bool:
    """Whether ``auto`` times anything for tensors on ``device`` (``DIT_ACCEL_KERNELS`` may force one backend)."""
    from .kernels import auto_candidates, requested

    return requested() == "auto" and bool(auto_candidates("block_sparse_attention", device))


def xformers_available() -> bool:
    """Whether the optional xformers package can be imported (it is never required)."""
    return importlib.util.find_spec("xformers") is not None


def _find_transformers(pipe: Any) -> dict[str, torch.nn.Module]:
    if isinstance(pipe, torch.nn.Module):
        return {"transformer": pipe} if find_family(pipe) is not None else {}
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        return {}
    return {
        name: comp
        for name, comp in components.items()
        if isinstance(comp, torch.nn.Module) and find_family(comp) is not None
    }


def _scheduler_source(pipe: Any) -> Any:
    """A callable returning the scheduler ``pipe`` holds now (a weak reference: the hooks do not keep it alive)."""
    try:
        ref = weakref.ref(pipe)
    except TypeError:
        return lambda: getattr(pipe, "scheduler", None)
    return lambda: getattr(ref(), "scheduler", None)


def _family_name(transformer: torch.nn.Module) -> str | None:
    family = find_family(transformer)
    return family.name if family is not None else None


#: what a ``per_transformer`` entry may set: any option of ``accelerate`` and the method itself
PER_TRANSFORMER_OPTIONS: tuple[str, ...] = tuple(sorted({*ALLOWED, "method"}))


def _per_transformer_configs(
    cfg: AccelConfig, per_transformer: Mapping[str, Mapping[str, Any]] | None, components: list[str]
) -> dict[str, AccelConfig]:
    """The config of each component: ``cfg``, changed by its ``per_transformer`` entry (validated here, before
    anything is installed, so a typo never leaves one expert accelerated with the shared options)."""
    if per_transformer is None:
        return {name: cfg for name in components}
    if not isinstance(per_transformer, Mapping):
        raise ValueError(
            f"per_transformer={per_transformer!r} must be a dict from a transformer component name "
            f"({', '.join(components)}) to a dict of options"
        )
    unknown = sorted(set(per_transformer) - set(components), key=str)
    if unknown:
        raise ValueError(
            f"per_transformer names {', '.join(map(repr, unknown))}, which this pipeline has no supported "
            f"transformer for; allowed: {', '.join(components)}"
        )
    out: dict[str, AccelConfig] = {}
    for name in components:
        entry = per_transformer.get(name)
        if entry is None:
            out[name] = cfg
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(f"per_transformer[{name!r}]={entry!r} must be a dict of options")
        bad = sorted(set(entry) - set(PER_TRANSFORMER_OPTIONS), key=str)
        if bad:
            raise ValueError(
                f"per_transformer[{name!r}] has unknown option(s) {', '.join(map(repr, bad))}; "
                f"allowed: {', '.join(PER_TRANSFORMER_OPTIONS)}"
            )
        entry = dict(entry)
        method = entry.pop("method", cfg.method)
        try:
            out[name] = resolve_config(method, cfg, **entry)
        except ValueError as exc:
            raise ValueError(f"per_transformer[{name!r}]: {exc}") from exc
    return out


def accelerate(
    pipe: Any,
    method: str | None = None,
    *,
    config: AccelConfig | None = None,
    per_transformer: Mapping[str, Mapping[str, Any]] | None = None,
    **options: Any,
) -> AccelHandle:
    """Replace dense self-attention in ``pipe`` with step-aware sparse attention.

    Args:
        pipe: a diffusers pipeline, or a bare transformer (then pass ``num_steps`` for step-based schedules).
        method: a name from ``dit_accel.METHODS``; None uses the project's default preset.
        config: a base :class:`AccelConfig`; ``options`` override its fields.
        per_transformer: options for one transformer component only, over the shared ones, e.g. for Wan 2.2's
            two experts ``{"transformer_2": {"sparsity": 0.8}}`` (any option below, or ``method``). Keys are the
            pipeline's component names (``stats()["transformers"]`` lists them); an unknown name or option is a
            ``ValueError``. Step options count the pipeline's global denoising step for every expert: the
            low-noise expert of Wan 2.2 starts at step k, so ``dense_steps=2`` keeps steps 0 and 1 dense,
            whichever expert runs them.
        **options: any :class:`AccelConfig` field, such as ``sparsity=0.9`` or ``dense_layers="0,1"``.

    Calling it again on an accelerated pipeline replaces the earlier installation (its handle goes inactive).
    Instance-scoped: only this pipeline's modules get hooks, and ``handle.remove()`` takes them all off.
    """
    cfg = resolve_config(method, config, **options)
    if cfg.dense_backend == "xformers" and not xformers_available():
        raise ValueError("dense_backend='xformers' needs xformers: pip install 'dit-accel[xformers]'")
    transformers = _find_transformers(pipe)
    if not transformers:
        from .pipelines.families import FAMILIES

        supported = ", ".join(c for fam in FAMILIES for c in fam.classes)
        raise TypeError(
            f"accelerate(pipe=...) found no supported transformer in {type(pipe).__name__}; "
            f"supported transformer classes: {supported}"
        )
    for transformer in transformers.values():  # before installing anything: refuse ring/unified CP early
        check_context_parallel(transformer)
    scheduler = getattr(pipe, "scheduler", None)
    # the scheduler is read from the pipeline at every forward: `pipe.scheduler = X.from_config(...)` is common
    scheduler_source = _scheduler_source(pipe) if scheduler is not None else None
    # a paper's schedule is set per model: each transformer runs the preset's schedule for its family
    chosen = _per_transformer_configs(cfg, per_transformer, list(transformers))
    configs = {name: chosen[name].for_family(_family_name(t)) for name, t in transformers.items()}
    for run_cfg in configs.values():
        if run_cfg.dense_backend == "xformers" and not xformers_available():  # a per_transformer entry's too
            raise ValueError("dense_backend='xformers' needs xformers: pip install 'dit-accel[xformers]'")
        if scheduler is None and run_cfg.num_steps is None and isinstance(run_cfg.dense_steps, float):
            if run_cfg.dense_steps > 0:
                raise ValueError(
                    f"dense_steps={run_cfg.dense_steps!r} is a fraction of the denoising steps, but "
                    f"{type(pipe).__name__} has no scheduler to count them, so every call would stay dense: pass "
                    "num_steps=N (the steps you will run) or an int dense_steps"
                )
    for name, transformer in transformers.items():
        family = find_family(transformer)
        if configs[name].tile_permutation == "per_forward" and (family is None or family.token_order is None):
            from .pipelines.families import FAMILIES

            able = ", ".join(f.name for f in FAMILIES if f.token_order is not None)
            raise ValueError(
                f"tile_permutation='per_forward' is not supported for {name} ({type(transformer).__name__}, family "
                f"{family.name if family else None!r}); supported families: {able}; use 'per_call'"
            )
    accelerators: dict[str, Accelerator] = {}
    ledger = CacheLedger()
    for name, transformer in transformers.items():
        previous = getattr(transformer, _ATTR, None)
        if previous is not None:
            previous.remove()
        family = find_family(transformer)
        acc = Accelerator(transformer, family, configs[name], scheduler=scheduler_source, ledger=ledger)
        try:
            acc.install()
        except Exception:
            acc.remove()
            for done in accelerators.values():
                done.remove()
            raise
        setattr(transformer, _ATTR, acc)
        accelerators[name] = acc
    return AccelHandle(cfg, accelerators)
