"""``ToyVideoPipeline``: the toy model as a diffusers pipeline that drives its transformer like ``WanPipeline``.

Pixel space, no VAE: the transformer denoises RGB clips in [-1, 1] directly. The denoising loop mirrors diffusers'
``WanPipeline`` (two transformer calls per step under ``cache_context("cond" / "uncond", step_index=..., ...)``),
so dit_accel's hooks see exactly the signals they see on a real Wan pipeline.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .model import model_input as toy_model_input
from .text import ToyTextEncoder, ToyVocabularyWarning


@dataclass
class ToyVideoPipelineOutput(BaseOutput):
    """Like ``WanPipelineOutput``: ``frames`` is (B, F, H, W, 3) in [0, 1] for "np", (B, F, 3, H, W) for "pt"."""

    frames: np.ndarray | torch.Tensor


class ToyVideoPipeline(DiffusionPipeline):
    """Text-to-video in pixel space with a small ``WanTransformer3DModel`` and a word-level text encoder."""

    model_cpu_offload_seq = "text_encoder->transformer"
    # A prompt from the training grammar, for callers (e.g. ``dit-accel render``) that have none of their own.
    default_prompt = "a red circle moves right over a striped background"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        text_encoder: ToyTextEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> ToyVideoPipeline:
        """Load from a local directory; the text encoder is loaded explicitly so no export from ``dit_accel`` is
        needed for diffusers to resolve it."""
        path = os.fspath(pretrained_model_name_or_path)
        if "text_encoder" not in kwargs and os.path.isdir(os.path.join(path, "text_encoder")):
            kwargs["text_encoder"] = ToyTextEncoder.from_pretrained(os.path.join(path, "text_encoder"))
            if "torch_dtype" in kwargs:
                kwargs["text_encoder"] = kwargs["text_encoder"].to(kwargs["torch_dtype"])
        return super().from_pretrained(path, **kwargs)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self) -> torch.Tensor | None:
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings for the cond branch and (with CFG) the uncond branch; the default negative is the empty
        prompt, which is what the model was trained to treat as unconditional.

        Words the encoder ignores (outside its vocabulary, or past its ``max_length``) give one
        :class:`~dit_accel.toy.text.ToyVocabularyWarning` per call, naming them and the vocabulary.
        """
        device = device or self._execution_device
        read: list[str] = []
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            read += prompts
            prompt_embeds = self.text_encoder.encode(prompts)
        prompt_embeds = prompt_embeds.to(device).repeat_interleave(num_videos_per_prompt, dim=0)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            batch = prompt_embeds.shape[0] // num_videos_per_prompt
            negative_prompt = negative_prompt or ""
            negs = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != batch:
                raise ValueError(f"negative_prompt has {len(negs)} entries; expected {batch} (one per prompt)")
            read += negs
            negative_prompt_embeds = self.text_encoder.encode(negs)
        problems = self.text_encoder.prompt_problems(read) if read else None
        if problems:
            warnings.warn(problems, ToyVocabularyWarning, stacklevel=4)  # at the pipe(...) call
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device).repeat_interleave(num_videos_per_prompt, 0)
        return prompt_embeds, negative_prompt_embeds

    def check_inputs(self, prompt: Any, prompt_embeds: Any, num_frames: int, height: int, width: int) -> None:
        """Clear errors for shapes the patch grid cannot tile."""
        p_t, p_h, p_w = self.transformer.config.patch_size
        if height % p_h or width % p_w:
            raise ValueError(f"height={height}, width={width}: both must be divisible by the patch ({p_h}, {p_w})")
        if num_frames % p_t or num_frames < 1:
            raise ValueError(f"num_frames={num_frames}: must be a positive multiple of {p_t}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt or prompt_embeds")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 64,
        width: int = 64,
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
    ) -> ToyVideoPipelineOutput | tuple:
        """Generate clips. Defaults give the project's reference render: 16 x 64 x 64 px = 4,096 tokens per
        self-attention call, 10 Euler steps with CFG (20 transformer calls)."""
        self.check_inputs(prompt, prompt_embeds, num_frames, height, width)
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; expected 'np', 'pt' or 'latent'")
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self._guidance_scale = guidance_scale
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            self.do_classifier_free_guidance,
            num_videos_per_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            device,
        )
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shape = (prompt_embeds.shape[0], self.transformer.config.out_channels, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.to(device=device, dtype=torch.float32)
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        latents = self._denoise(
            latents, timesteps, prompt_embeds, negative_prompt_embeds, attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end, tensor_inputs=tensor_inputs,
        )  # fmt: skip
        return self._finish(latents, output_type, return_dict)

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        *,
        first_step: int = 0,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Any = None,
        tensor_inputs: list[str] | None = None,
    ) -> torch.Tensor:
        """The Euler loop over ``timesteps``, the schedule's steps from index ``first_step`` on (0 for text-to-video;
        video-to-video starts part-way), shared by every toy pipeline so all of them drive the transformer alike."""
        dtype = self.transformer.dtype
        guidance_scale = self._guidance_scale
        tensor_inputs = tensor_inputs or ["latents"]
        total = first_step + len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                model_input = toy_model_input(self.transformer, latents.to(dtype))
                timestep = t.expand(latents.shape[0])
                index = first_step + i
                ctx = {"step_index": index, "sigma": float(self.scheduler.sigmas[index]), "num_inference_steps": total}
                with self.transformer.cache_context("cond", **ctx):
                    noise_pred = self.transformer(
                        hidden_states=model_input,
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                    )[0]
                if self.do_classifier_free_guidance:
                    with self.transformer.cache_context("uncond", **ctx):
                        noise_uncond = self.transformer(
                            hidden_states=model_input,
                            timestep=timestep,
                            encoder_hidden_states=negative_prompt_embeds,
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                        )[0]
                    noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
                latents = self.scheduler.step(noise_pred.float(), t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs})
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = out.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        self._current_timestep = None
        return latents

    def _finish(self, latents: torch.Tensor, output_type: str, return_dict: bool) -> ToyVideoPipelineOutput | tuple:
        """Pixel space: the latents are the clip in [-1, 1]; "np"/"pt" map it to [0, 1] frames."""
        if output_type == "latent":
            video: np.ndarray | torch.Tensor = latents
        else:
            pixels = ((latents.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)  # (B, F, C, H, W)
            video = pixels if output_type == "pt" else pixels.permute(0, 1, 3, 4, 2).cpu().float().numpy()

        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return ToyVideoPipelineOutput(frames=video)
