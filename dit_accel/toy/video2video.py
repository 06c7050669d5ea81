"""``ToyVideoToVideoPipeline``: SDEdit on the toy model, in pixel space.

It noises a clip to the point ``strength`` of the schedule and denoises the rest, like diffusers'
``WanVideoToVideoPipeline``, and has the same interface (``get_timesteps``, ``prepare_latents``, ``latents=`` taken as
already noised), so FreeSwim's refinement drives either one. The toy has no VAE: a clip is its own latent, so
encoding is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .pipeline import ToyVideoPipeline, ToyVideoPipelineOutput

__all__ = ["ToyVideoToVideoPipeline"]


class ToyVideoToVideoPipeline(ToyVideoPipeline):
    """Video-to-video on the toy: ``video`` is a (B, 3, F, H, W) clip in [-1, 1] (the toy's pixel space)."""

    #: pixel space: no VAE, one latent pixel per pixel and one latent frame per frame
    vae_scale_factor_spatial = 1
    vae_scale_factor_temporal = 1

    def get_timesteps(
        self, num_inference_steps: int, timesteps: torch.Tensor, strength: float, device: Any = None
    ) -> tuple[torch.Tensor, int]:
        """The last ``strength`` of the schedule and how many steps that is (``WanVideoToVideoPipeline``'s rule)."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        return timesteps[t_start * self.scheduler.order :], num_inference_steps - t_start

    def _check_video(self, video: Any, height: int | None, width: int | None) -> torch.Tensor:
        channels = self.transformer.config.out_channels  # pixels; in_channels adds any coordinate planes
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != channels:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video={shape}: expected a (B, {channels}, F, H, W) tensor in [-1, 1]")
        for name, value, size in (("height", height, video.shape[3]), ("width", width, video.shape[4])):
            if value is not None and value != size:
                raise ValueError(f"{name}={value} differs from the video's {size}; leave it out or resize the video")
        return video

    def prepare_latents(
        self,
        video: torch.Tensor | None = None,
        batch_size: int = 1,
        num_channels_latents: int = 3,
        height: int | None = None,
        width: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``latents`` as given (already noised), else ``video`` noised to ``timestep`` (identity encode)."""
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        if video is None:
            raise ValueError("video=None and latents=None: pass the clip to refine, or its noised latents")
        init = self._check_video(video, height, width).to(device=device, dtype=dtype)
        if init.shape[0] not in (1, batch_size):
            raise ValueError(f"video has batch {init.shape[0]}; expected 1 or {batch_size} (one per prompt)")
        init = init.expand(batch_size, *init.shape[1:])
        noise = randn_tensor(init.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.scale_noise(init, timestep, noise)

    @torch.no_grad()
    def __call__(
        self,
        video: torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 10,
        strength: float = 0.8,
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
    ) -> ToyVideoPipelineOutput | tuple:
        """Refine ``video`` (or denoise ``latents``, already noised to the first kept step) over the last
        ``strength`` of ``num_inference_steps``; the size is the clip's."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength!r} must be a number in (0, 1]")
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; expected 'np', 'pt' or 'latent'")
        clip = latents if latents is not None else self._check_video(video, height, width)
        if not isinstance(clip, torch.Tensor) or clip.dim() != 5:
            raise ValueError("latents must be a (B, C, F, H, W) tensor")
        self.check_inputs(prompt, prompt_embeds, clip.shape[2], clip.shape[3], clip.shape[4])
        self._guidance_scale = guidance_scale
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, num_videos_per_prompt, prompt_embeds,
            negative_prompt_embeds, device,
        )  # fmt: skip
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps, steps = self.get_timesteps(num_inference_steps, self.scheduler.timesteps, strength, device)
        if steps < 1 or len(timesteps) == 0:
            raise ValueError(
                f"strength={strength} with num_inference_steps={num_inference_steps} leaves no step; raise one of them"
            )
        first = len(self.scheduler.timesteps) - len(timesteps)
        latents = self.prepare_latents(
            video, prompt_embeds.shape[0], self.transformer.config.out_channels, height, width, torch.float32, device,
            generator, latents, timesteps[:1].repeat(prompt_embeds.shape[0]),
        )  # fmt: skip
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(first)
        latents = self._denoise(
            latents, timesteps, prompt_embeds, negative_prompt_embeds, first_step=first,
            attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
            tensor_inputs=callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        return self._finish(latents, output_type, return_dict)
