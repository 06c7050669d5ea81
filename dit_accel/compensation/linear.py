"""SLA's linear branch and how it is combined with the sparse one.

``proj`` (the paper): O = O_s + proj(O_l) with proj a zero-initialised Linear per site, so untuned SLA is
sparse-only attention and fine-tuning has to teach proj both the missing mass and the mismatch of the
renormalised sparse softmax (SLA2's critique). ``mass`` (training-free, after SLA2): O = alpha O_s +
(1 - alpha) O_l + proj(O_l) with alpha the softmax mass the critical blocks hold; alpha comes from the last
refresh when the schedule has one, else from :func:`dit_accel.kernels.kept_mass`.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "LoRALinear",
    "SLAProjections",
    "add_lora",
    "combine_linear",
    "load_sla_weights",
    "lora_parameters",
    "remove_lora",
    "save_sla_weights",
]


class SLAProjections(torch.nn.Module):
    """One zero-initialised ``Linear(head_dim, head_dim)`` (fp32) per attention site, created on first use.

    ``trained`` is False until weights are loaded (:func:`load_sla_weights`) or fitted (scripts/finetune_sla.py):
    until then inference skips the layers, which would add zeros at the cost of a matmul per call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.ModuleDict()
        self.trained = False

    def get(self, site_index: int, head_dim: int, device: torch.device) -> torch.nn.Linear:
        key = str(site_index)
        if key not in self.proj:
            layer = torch.nn.Linear(head_dim, head_dim, device=device, dtype=torch.float32)
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
            self.proj[key] = layer
        layer = self.proj[key]
        if layer.weight.device != device:
            layer.to(device)
        return layer  # type: ignore[return-value]


def combine_linear(
    o_sparse: torch.Tensor,
    o_linear: torch.Tensor,
    proj: torch.nn.Linear | None,
    alpha: torch.Tensor | None,
) -> torch.Tensor:
    """``alpha O_s + (1 - alpha) O_l + proj(O_l)``; without ``alpha`` the paper's ``O_s + proj(O_l)``.

    The blend is one ``lerp`` in the outputs' dtype (no float32 copies of the (B, H, N, D) outputs); ``proj``
    runs in float32 like its weights."""
    out = o_sparse if alpha is None else torch.lerp(o_linear, o_sparse, alpha[..., None].to(o_sparse.dtype))
    if proj is not None:
        out = out + proj(o_linear.float()).to(out.dtype)
    return out


class LoRALinear(torch.nn.Module):
    """``base(x) + up(down(x))``: a rank-r adapter on a frozen Linear (``up`` starts at zero: no change)."""

    def __init__(self, base: torch.nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        torch.nn.init.normal_(self.down.weight, std=1.0 / rank)
        torch.nn.init.zeros_(self.up.weight)

    @property
    def weight(self) -> torch.Tensor:  # processors that read the projection's weight/dtype keep working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


_LORA_TARGETS = ("to_q", "to_k", "to_v")


def add_lora(transformer: torch.nn.Module, attention_modules: list[torch.nn.Module], rank: int) -> int:
    """Wrap to_q/to_k/to_v/to_out[0] of each attention module in :class:`LoRALinear`; returns how many."""
    count = 0
    for module in attention_modules:
        for name in _LORA_TARGETS:
            layer = getattr(module, name, None)
            if isinstance(layer, torch.nn.Linear):
                setattr(module, name, LoRALinear(layer, rank))
                count += 1
        out = getattr(module, "to_out", None)
        if isinstance(out, torch.nn.ModuleList) and len(out) and isinstance(out[0], torch.nn.Linear):
            out[0] = LoRALinear(out[0], rank)
            count += 1
    return count


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable adapter weights of every :class:`LoRALinear` inside ``transformer``."""
    params: list[torch.nn.Parameter] = []
    for module in transformer.modules():
        if isinstance(module, LoRALinear):
            params += [module.down.weight, module.up.weight]
    return params


def save_sla_weights(handle: Any, path: str) -> None:
    """Save every site's proj (and the LoRA adapters found in the accelerated transformers) as safetensors."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for component, acc in handle.accelerators.items():
        projections = getattr(acc.method, "projections", None)
        if projections is not None:
            for site, layer in projections.proj.items():
                tensors[f"proj.{component}.{site}.weight"] = layer.weight.detach().cpu().contiguous()
                tensors[f"proj.{component}.{site}.bias"] = layer.bias.detach().cpu().contiguous()
        for name, module in acc.transformer.named_modules():
            if isinstance(module, LoRALinear):
                tensors[f"lora.{component}.{name}.down"] = module.down.weight.detach().cpu().contiguous()
                tensors[f"lora.{component}.{name}.up"] = module.up.weight.detach().cpu().contiguous()
    save_file(tensors, path, metadata={"method": str(handle.method)})


def load_sla_weights(handle: Any, path: str) -> None:
    """Load :func:`save_sla_weights` output into an accelerated pipeline (adds LoRA adapters where saved).

    LoRA adapters change the transformer's modules, so ``handle.remove()`` does not take them off (it only
    removes hooks): :func:`remove_lora` does.
    """
    from safetensors.torch import load_file

    tensors = load_file(path)
    for component, acc in handle.accelerators.items():
        device = next(acc.transformer.parameters()).device
        projections = getattr(acc.method, "projections", None)
        prefix = f"proj.{component}."
        for key, value in tensors.items():
            if key.startswith(prefix) and key.endswith(".weight"):
                if projections is None:
                    raise ValueError(f"{path}: holds SLA projections but method={handle.method!r} has none")
                site = int(key[len(prefix) : -len(".weight")])
                layer = projections.get(site, value.shape[0], device)
                layer.weight.data.copy_(value)
                layer.bias.data.copy_(tensors[f"{prefix}{site}.bias"])
                projections.trained = True
        modules = dict(acc.transformer.named_modules())
        lora_prefix = f"lora.{component}."
        for key, value in tensors.items():
            if not (key.startswith(lora_prefix) and key.endswith(".down")):
                continue
            name = key[len(lora_prefix) : -len(".down")]
            module = modules.get(name)
            if not isinstance(module, LoRALinear):
                parent_name, _, child = name.rpartition(".")
                parent = modules[parent_name]
                base = parent[int(child)] if child.isdigit() else getattr(parent, child)
                module = LoRALinear(base, value.shape[0])
                if child.isdigit():
                    parent[int(child)] = module
                else:
                    setattr(parent, child, module)
            module.down.weight.data.copy_(value)
            module.up.weight.data.copy_(tensors[f"{lora_prefix}{name}.up"])


def remove_lora(transformer: torch.nn.Module) -> int:
    """Put back the frozen Linear under every :class:`LoRALinear` in ``transformer`` (the undo of
    :func:`add_lora` and of the adapters :func:`load_sla_weights` adds); returns how many were removed."""
    count = 0
    for parent in list(transformer.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                if isinstance(parent, torch.nn.ModuleList):
                    parent[int(name)] = child.base
                else:
                    setattr(parent, name, child.base)
                count += 1
    return count
