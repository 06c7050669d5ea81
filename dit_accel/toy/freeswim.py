"""``ToyFreeSwimPipeline``: FreeSwim on the toy model, so higher-than-trained resolution can be tried offline.

The toy (trained at 64 x 64) is a stock diffusers Wan transformer in pixel space, with no VAE and no T5. This class
runs FreeSwim's shared code (:class:`dit_accel.pipelines.freeswim.FreeSwimMixin`: base pass, upscale, window-branch
refinement with the full branch's cross-attention cached) and supplies only the toy's steps: the base pass is
``ToyVideoPipeline``'s own call, the refinement :class:`ToyVideoToVideoPipeline`, and latents are frames (identity
decode and encode). Build it with ``FreeSwimPipeline.from_pipe(toy_pipe)``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from ..pipelines.freeswim import FreeSwimMixin, FreeSwimOptions
from .pipeline import ToyVideoPipeline, ToyVideoPipelineOutput
from .video2video import ToyVideoToVideoPipeline

__all__ = ["ToyFreeSwimPipeline", "freeswim_options"]

#: FreeSwimOptions' fields other than the base size (which the call names itself)
_OPTION_NAMES = tuple(f.name for f in fields(FreeSwimOptions) if f.name not in ("base_height", "base_width"))


def freeswim_options(base_height: int, base_width: int, extra: dict[str, Any]) -> FreeSwimOptions:
    """:class:`FreeSwimOptions` from keyword arguments; an unknown name is a ``ValueError`` listing the allowed."""
    unknown = sorted(set(extra) - set(_OPTION_NAMES))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a FreeSwim option; allowed: {', '.join(_OPTION_NAMES)}")
    return FreeSwimOptions(base_height=base_height, base_width=base_width, **extra)


class ToyFreeSwimPipeline(FreeSwimMixin, ToyVideoPipeline):
    """The toy pipeline rendering above its 64 x 64 training size with FreeSwim (the same components, nothing
    copied). Call it like ``ToyVideoPipeline`` plus ``base_height``/``base_width`` and any other
    :class:`FreeSwimOptions` field as a keyword (``strength``, ``cache_every``, ``window_size``, ...)."""

    #: pixel space: no VAE, so the latent grid is the pixel grid
    vae_scale_factor_spatial = 1
    vae_scale_factor_temporal = 1
    output_class = ToyVideoPipelineOutput

    def _make_refiner(self, scheduler: Any) -> ToyVideoToVideoPipeline:
        """The toy's pixel-space video-to-video pipeline on our components."""
        return ToyVideoToVideoPipeline(
            transformer=self.transformer, text_encoder=self.text_encoder, scheduler=scheduler
        )

    def decode_to_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixel space: the latents are the clip; clamped to [-1, 1] like a VAE decode."""
        return latents.float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 128,
        width: int = 128,
        num_frames: int = 16,
        num_inference_steps: int = 10,
        guidance_scale: float = 4.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        *,
        base_height: int = 64,
        base_width: int = 64,
        **freeswim: Any,
    ) -> ToyVideoPipelineOutput | tuple:
        """Base pass at ``base_height`` x ``base_width`` (the toy's training size by default), upscale, FreeSwim
        refinement at ``height`` x ``width``; ``freeswim`` are the other :class:`FreeSwimOptions` fields."""
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; expected 'np', 'pt' or 'latent'")
        options = freeswim_options(base_height, base_width, freeswim)
        return self._freeswim_call(
            options, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_frames=num_frames, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_videos_per_prompt=num_videos_per_prompt, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            return_dict=return_dict, attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )  # fmt: skip
