"""``tile_permutation="per_forward"``: the hidden states in 3D-tile order for a whole transformer forward.

With the default ``per_call`` every sparse call gathers q, k and v into tile order and scatters its output back
(four passes over (B, H, N, D) per call). Everything in a Wan block except self-attention is per token (norms,
modulation, projections, cross-attention's queries, the MLP), and self-attention with RoPE is permutation
equivariant once the RoPE frequencies are permuted with the tokens. So the tokens can enter the blocks in tile
order and leave them in raster order, one permutation of (B, N, C) at each end per forward:

* the patch embedding's output (B, C, F, H, W) is returned with its raster flattening permuted (same shape), so
  the model's own ``flatten(2).transpose(1, 2)`` produces the tile-ordered sequence, before any block (a step
  cache hooked on the blocks sees one order throughout);
* per-token outputs of other modules are permuted along dim 1: the RoPE frequencies, and the per-token timestep
  embeddings of Wan 2.2 TI2V;
* the output projection's (B, N, C') result is permuted back, before the model's unpatchify.

All of it is diffusers ``ModelHook`` s on this instance's modules, named by the family
(:class:`~dit_accel.pipelines.families.TokenOrderSpec`); nothing shared is patched. A forward runs in tile order
only when the accelerator says so (:meth:`ForwardOrder.begin`): a sparse call is possible in it, there is no
context parallelism (its split hooks cut the raster sequence) and it is not being traced by ``torch.compile``
(the compiled graph keeps the per-call path).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .families import TokenOrderSpec

__all__ = ["TOKEN_ORDER_HOOK", "ForwardOrder"]

TOKEN_ORDER_HOOK = "dit_accel.token_order"


def _tokens_at_dim1(x: Any, n: int) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() >= 3 and x.shape[1] == n


class _OrderHook(ModelHook):
    """Applies one of the three rewrites of :class:`ForwardOrder` to a module's output."""

    def __init__(self, order: ForwardOrder, role: str, positions: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.order = order
        self.role = role
        self.positions = positions

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        perm, inv = self.order.perm, self.order.inv
        if perm is None or inv is None or torch.compiler.is_compiling():
            return output
        n = perm.numel()
        if self.role == "entry":
            if not isinstance(output, torch.Tensor) or output.dim() < 3 or output[0, 0].numel() != n:
                return output
            return output.flatten(2).index_select(2, perm).view(output.shape)
        if self.role == "exit":
            return output.index_select(1, inv) if _tokens_at_dim1(output, n) else output
        items = list(output) if isinstance(output, (tuple, list)) else [output]
        for i in self.positions:
            if i < len(items) and _tokens_at_dim1(items[i], n):
                items[i] = items[i].index_select(1, perm)
        return type(output)(items) if isinstance(output, (tuple, list)) else items[0]


class ForwardOrder:
    """The token order of one transformer's open forward, and the hooks that keep its modules in it."""

    def __init__(self, transformer: torch.nn.Module, spec: TokenOrderSpec) -> None:
        self.transformer = transformer
        self.spec = spec
        self.perm: torch.Tensor | None = None
        self.inv: torch.Tensor | None = None
        self.forwards = 0  # forwards that ran in tile order (stats)
        self._modules: list[torch.nn.Module] = []

    def install(self) -> None:
        roles = [(self.spec.entry, "entry", ()), (self.spec.exit, "exit", ())]
        roles += [(name, "per_token", positions) for name, positions in self.spec.per_token]
        for name, role, positions in roles:
            module = self.transformer.get_submodule(name)
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_OrderHook(self, role, positions), TOKEN_ORDER_HOOK)
            self._modules.append(module)

    def remove(self) -> None:
        from ..runtime import remove_hook

        for module in self._modules:
            remove_hook(module, TOKEN_ORDER_HOOK)
        self._modules = []
        self.end()

    def begin(self, perm: torch.Tensor | None, inv: torch.Tensor | None) -> None:
        """Run the forward about to start in the order ``perm`` (``x_tiled = x[:, perm]``), or natively (None)."""
        self.perm, self.inv = perm, inv
        if perm is not None:
            self.forwards += 1

    def end(self) -> None:
        self.perm = self.inv = None
