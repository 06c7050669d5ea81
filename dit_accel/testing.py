"""Tiny random-weight diffusers pipelines, built offline from configs (no text encoder, no hub).

Used by the tests and by ``dit-accel render --model tiny-wan``. Each builder returns the pipeline and the call
arguments (``prompt_embeds`` and friends instead of prompts), sized so self-attention sees several hundred tokens.
:class:`HostSyncCounter` counts the calls that copy a tensor value to the host (device syncs on a GPU).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["TINY_FAMILIES", "HostSyncCounter", "tiny_pipeline"]

#: Tensor methods that copy a value to the host: on a GPU each waits for the stream.
HOST_SYNCS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
    torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
}  # fmt: skip


class HostSyncCounter(TorchFunctionMode):
    """Counts host-sync calls made inside it, by ``where`` (a label the caller sets around what it measures).

    Calls from the PyTorch reference kernels (the CPU oracle; on CUDA the Triton kernels run), from the fused CPU
    kernels (CPU tensors only, where a "sync" waits for nothing) and from ``kernel_backend="auto"``'s check and
    timing (once per call key and process, like the Triton autotuner's benchmark) are left out.
    """

    def __init__(self) -> None:
        super().__init__()
        self.where = "model"
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS and not _in_reference_kernels():
            self.counts[self.where] = self.counts.get(self.where, 0) + 1
        return func(*args, **(kwargs or {}))


def _in_reference_kernels() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(
            ("kernels/reference.py", "kernels/masks.py", "kernels/cpu.py", "kernels/auto.py")
        ):
            return True
        frame = frame.f_back
    return False


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _padded_mask(tokens: int, real: int) -> torch.Tensor:
    """A tokenizer's attention mask (1, tokens) for a prompt of ``real`` tokens padded at the end, as real
    pipelines pad prompts to a fixed length (HunyuanVideo to 256): ones, then zeros."""
    mask = torch.zeros(1, tokens, dtype=torch.long)
    mask[:, :real] = 1
    return mask


def _wan_vae() -> Any:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


#: the tiny Wan-style transformer's shape, shared by the Wan, VACE, Animate and SkyReels-V2 builders
_WAN_DIMS: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)


def _wan_transformer(in_channels: int = 16) -> Any:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(in_channels=in_channels, **_WAN_DIMS)


def _wan(seed: int, image_to_video: bool = False) -> tuple[Any, dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    vae = _wan_vae()
    transformer = _wan_transformer(36 if image_to_video else 16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    kwargs: dict[str, Any] = dict(
        prompt_embeds=_embeds(seed + 1, 1, 16, 32),
        negative_prompt_embeds=_embeds(seed + 2, 1, 16, 32),
        height=256,
        width=256,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="latent",
    )
    if image_to_video:
        from diffusers import WanImageToVideoPipeline

        pipe = WanImageToVideoPipeline(
            tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer
        )
        kwargs["image"] = torch.rand(1, 3, 256, 256, generator=_gen(seed + 3))
    else:
        from diffusers import WanPipeline

        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)
    return pipe, kwargs


def _wan_i2v(seed: int) -> tuple[Any, dict[str, Any]]:
    return _wan(seed, image_to_video=True)


#: Wan 2.2's boundary in the tiny two-expert pipeline: with shift 7 and 4 steps the timesteps are about
#: 1000, 934, 781, 47, so the high-noise ``transformer`` runs steps 0-1 (t >= 875) and ``transformer_2`` steps 2-3
WAN22_BOUNDARY_RATIO = 0.875


def _wan22(seed: int) -> tuple[Any, dict[str, Any]]:
    """Wan 2.2 A14B's layout: two experts of one architecture, switched at ``boundary_ratio`` of the timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = _wan_vae()
    transformer = _wan_transformer()
    transformer_2 = _wan_transformer()  # other random weights: the experts must not be interchangeable
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=WAN22_BOUNDARY_RATIO,
    )
    return pipe, _wan_call(seed, num_inference_steps=4, guidance_scale_2=3.0)


def _wan_call(seed: int, **extra: Any) -> dict[str, Any]:
    """Call arguments of the Wan-style pipelines: 128 x 256 pixels (16 x 32 latent, 8 x 16 after patchify: not
    square, so a grid with rows and columns swapped fails), 5 frames (2 latent frames): 256 tokens, 4 key blocks
    (few pixels: the VAE encodes the control and pose videos on the CPU)."""
    out: dict[str, Any] = dict(
        prompt_embeds=_embeds(seed + 1, 1, 16, 32),
        negative_prompt_embeds=_embeds(seed + 2, 1, 16, 32),
        height=128,
        width=256,
        num_frames=5,
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="latent",
    )
    out.update(extra)
    return out


def _wan_vace(seed: int) -> tuple[Any, dict[str, Any]]:
    """Wan VACE: the main blocks and the VACE blocks (control hints) both run self-attention over the video."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline, WanVACETransformer3DModel

    torch.manual_seed(seed)
    transformer = WanVACETransformer3DModel(in_channels=16, vace_layers=[0, 1], vace_in_channels=96, **_WAN_DIMS)
    pipe = WanVACEPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer,
    )
    video = [_pil(seed + 3 + i, 256, 128) for i in range(5)]
    return pipe, _wan_call(seed, video=video)


def _pil(seed: int, width: int, height: int) -> Any:
    import numpy as np
    from PIL import Image

    pixels = torch.randint(0, 256, (height, width, 3), generator=_gen(seed), dtype=torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))


def _wan_animate(seed: int) -> tuple[Any, dict[str, Any]]:
    """Wan Animate: blocks.*.attn1 is video self-attention; the face adapter's attention is cross-attention from
    each frame's video tokens to that frame's motion tokens (not hooked). CLIP features come as ``image_embeds``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    dims = dict(_WAN_DIMS, out_channels=16)
    transformer = WanAnimateTransformer3DModel(
        in_channels=36,
        latent_channels=16,
        image_dim=8,
        motion_encoder_channel_sizes={"4": 4, "8": 4, "16": 4},
        motion_encoder_size=16,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=8,
        face_encoder_hidden_dim=8,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=1,
        motion_encoder_batch_size=4,
        **dims,
    )
    # the pipeline refuses ``image_embeds`` next to ``image`` and needs ``image`` for the reference latents, so
    # the CLIP features come from a tiny random CLIP vision tower (its second-to-last hidden states, 8 wide)
    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
        )
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = WanAnimatePipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_processor=processor,
        image_encoder=encoder,
        transformer=transformer,
    )
    # 9 frames at 64 x 256: 3 latent frames and the reference image's, 4 x 4 x 16 = 256 tokens (4 key blocks)
    kwargs = _wan_call(
        seed,
        height=64,
        image=_pil(seed + 3, 256, 64),
        pose_video=[_pil(seed + 4 + i, 256, 64) for i in range(9)],
        face_video=[_pil(seed + 20 + i, 16, 16) for i in range(9)],
        segment_frame_length=9,
        prev_segment_conditioning_frames=1,
    )
    kwargs.pop("num_frames")  # Animate's length is the pose video's
    return pipe, kwargs


def _skyreels_transformer(num_frame_per_block: int = 1) -> Any:
    from diffusers import SkyReelsV2Transformer3DModel

    return SkyReelsV2Transformer3DModel(in_channels=16, num_frame_per_block=num_frame_per_block, **_WAN_DIMS)


def _skyreels_v2(seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

    torch.manual_seed(seed)
    pipe = SkyReelsV2Pipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_wan_vae(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0),
        transformer=_skyreels_transformer(),
    )
    return pipe, _wan_call(seed)


def _skyreels_v2_df(seed: int) -> tuple[Any, dict[str, Any]]:
    """SkyReels-V2 diffusion forcing, synchronous (``ar_step=0``): one timestep per latent frame, all equal."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler

    torch.manual_seed(seed)
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_wan_vae(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0),
        transformer=_skyreels_transformer(),
    )
    return pipe, _wan_call(seed, prompt=None, base_num_frames=5)


def _cogvideox(seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=2,
        sample_width=32,
        sample_height=32,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DDIMScheduler()
    )
    kwargs = dict(
        prompt_embeds=_embeds(seed + 1, 1, 16, 32),
        negative_prompt_embeds=_embeds(seed + 2, 1, 16, 32),
        height=256,
        width=256,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="latent",
    )
    return pipe, kwargs


def _hunyuan_video(seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    # A padded prompt: 20 real text tokens of 80, so self-attention over 768 video + 80 text tokens gets a (B, 1, 1, N)
    # key-padding mask with a fully masked last 64-token key block (832..847) and a partly masked one (768..831).
    kwargs = dict(
        prompt_embeds=_embeds(seed + 1, 1, 80, 16),
        pooled_prompt_embeds=_embeds(seed + 2, 1, 8),
        prompt_attention_mask=_padded_mask(80, 20),
        height=128,
        width=128,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=4.0,
        output_type="latent",
    )
    return pipe, kwargs


def _ltx_video(seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    kwargs = dict(
        prompt_embeds=_embeds(seed + 1, 1, 16, 32),
        prompt_attention_mask=_padded_mask(16, 11),  # cross-attention only: self-attention sees no mask
        negative_prompt_embeds=_embeds(seed + 2, 1, 16, 32),
        negative_prompt_attention_mask=_padded_mask(16, 3),
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=3.0,
        output_type="latent",
    )
    return pipe, kwargs


def _pixart(seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=32,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4)
    pipe = PixArtSigmaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DDIMScheduler()
    )
    kwargs = dict(
        prompt_embeds=_embeds(seed + 1, 1, 16, 32),
        prompt_attention_mask=_padded_mask(16, 11),  # cross-attention only: self-attention sees no mask
        negative_prompt=None,
        negative_prompt_embeds=_embeds(seed + 2, 1, 16, 32),
        negative_prompt_attention_mask=_padded_mask(16, 3),
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=4.0,
        use_resolution_binning=False,
        output_type="latent",
    )
    return pipe, kwargs


def _flux(seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    kwargs = dict(
        prompt_embeds=_embeds(seed + 1, 1, 16, 32),
        pooled_prompt_embeds=_embeds(seed + 2, 1, 32),
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=3.5,
        output_type="latent",
    )
    return pipe, kwargs


def _flux2(seed: int) -> tuple[Any, dict[str, Any]]:
    """Flux 2: joint attention, text first; 64 x 128 pixels pack into a 16 x 32 token grid (4-column img ids)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        mlp_ratio=1.0,
        axes_dims_rope=(4, 4, 4, 4),
    )
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=32,
    )
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    kwargs = dict(
        prompt_embeds=_embeds(seed + 1, 1, 16, 32),
        height=64,
        width=128,
        num_inference_steps=3,
        guidance_scale=4.0,
        output_type="latent",
    )
    return pipe, kwargs


def _passthrough_safety_checker() -> Any:
    """Cosmos pipelines refuse to run without a safety checker, and the real one (the ``cosmos_guardrail``
    package) is a multi-GB model: this one passes every prompt and video through unchanged, which is all the
    pipeline asks of it (``check_text_safety``, ``check_video_safety``, ``.to``)."""
    from diffusers import ConfigMixin, ModelMixin

    class PassThroughSafetyChecker(ModelMixin, ConfigMixin):
        def __init__(self) -> None:
            super().__init__()
            # one parameter, so the pipeline can read this component's device and dtype like any model's
            self._anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

        def check_text_safety(self, prompt: str) -> bool:
            return True

        def check_video_safety(self, video: Any) -> Any:
            return video

    return PassThroughSafetyChecker()


def _cosmos(seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKLCosmos, CosmosTextToWorldPipeline, CosmosTransformer3DModel, EDMEulerScheduler

    torch.manual_seed(seed)
    transformer = CosmosTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(8, 64, 64),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False,  # True resizes the padding mask with torchvision, not a dependency here
        extra_pos_embed_type="learnable",
    )
    vae = AutoencoderKLCosmos(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        encoder_block_out_channels=(8, 8, 8, 8),
        decode_block_out_channels=(8, 8, 8, 8),
        attention_resolutions=(8,),
        resolution=64,
        num_layers=2,
        patch_size=4,
        patch_type="haar",
        scaling_factor=1.0,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    )
    scheduler = EDMEulerScheduler(
        sigma_min=0.002,
        sigma_max=80,
        sigma_data=0.5,
        sigma_schedule="karras",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        rho=7.0,
        final_sigmas_type="sigma_min",
    )
    pipe = CosmosTextToWorldPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        safety_checker=_passthrough_safety_checker(),
    )
    # 9 frames at 128 x 128 -> latents (3, 32, 32) -> 3 x 16 x 16 = 768 video tokens
    kwargs = dict(
        prompt_embeds=_embeds(seed + 1, 1, 16, 32),
        negative_prompt_embeds=_embeds(seed + 2, 1, 16, 32),
        height=128,
        width=128,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=3.0,
        output_type="latent",
    )
    return pipe, kwargs


def _mochi(seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=32,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    )
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),  # its group norms have 32 groups
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    )
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    # 13 frames at 256 x 256 -> latents (3, 32, 32) -> 3 x 16 x 16 = 768 video tokens (patch 2, no temporal
    # patch). The prompt keeps 11 of 16 tokens, the negative 3: the processor drops the padded ones before each
    # sample's own SDPA call, so the two calls differ in length.
    kwargs = dict(
        prompt_embeds=_embeds(seed + 1, 1, 16, 32),
        prompt_attention_mask=_padded_mask(16, 11),
        negative_prompt_embeds=_embeds(seed + 2, 1, 16, 32),
        negative_prompt_attention_mask=_padded_mask(16, 3),
        height=256,
        width=256,
        num_frames=13,
        num_inference_steps=3,
        guidance_scale=4.5,
        output_type="latent",
    )
    return pipe, kwargs


def _ltx2_video(seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    torch.manual_seed(seed)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=32,
        rope_double_precision=False,
        rope_type="split",
    )
    # the text connectors turn the text encoder's per-layer states (32 channels x 2 layers) into the video and
    # audio prompt streams the transformer cross-attends to
    connectors = LTX2TextConnectors(
        caption_channels=32,
        text_proj_in_factor=2,
        video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32,
        rope_theta=10000.0,
        rope_double_precision=False,
        causal_temporal_positioning=False,
        rope_type="split",
    )
    vae = AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        layers_per_block=(1,),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False),
        downsample_type=("spatial",),
        upsample_residual=(False,),
        upsample_factor=(1,),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=2,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=16000,
        mel_hop_length=160,
        is_causal=True,
        mel_bins=8,
    )
    vocoder = LTX2Vocoder(
        in_channels=2 * 8,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )
    pipe = LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=None,
        tokenizer=None,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )
    # 5 frames at 32 x 32 -> latents (3, 16, 16): 768 video tokens. Classifier-free guidance only (the LTX-2.0
    # sampling knobs): spatio-temporal and modality guidance are off, so each step is one batched forward.
    kwargs = dict(
        prompt_embeds=_embeds(seed + 1, 1, 16, 64),
        prompt_attention_mask=_padded_mask(16, 11),
        negative_prompt_embeds=_embeds(seed + 2, 1, 16, 64),
        negative_prompt_attention_mask=_padded_mask(16, 3),
        height=32,
        width=32,
        num_frames=5,
        frame_rate=25.0,
        num_inference_steps=3,
        guidance_scale=3.0,
        stg_scale=0.0,
        modality_scale=1.0,
        guidance_rescale=0.0,
        audio_guidance_scale=3.0,
        audio_stg_scale=0.0,
        audio_modality_scale=1.0,
        audio_guidance_rescale=0.0,
        spatio_temporal_guidance_blocks=None,
        use_cross_timestep=False,
        output_type="latent",
    )
    return pipe, kwargs


def _hunyuan_video15(seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance

    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,  # text-to-video: latents, conditioning latents (zeros) and their mask channel
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=32,
        image_embed_dim=12,
        rope_axes_dim=(4, 6, 6),
        target_size=16,
        task_type="t2v",
    )
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=4.0),
    )
    # 3 frames at 64 x 64 -> latents (2, 16, 16): 512 video tokens, then per sample the pipeline's 729 image
    # tokens (all zeros and masked out in text-to-video), 8 ByT5 tokens (5 real) and 16 MLLM tokens (11 real);
    # two steps, as the 1,265-token calls are the slowest of the tiny families on the CPU reference kernels.
    kwargs = dict(
        prompt_embeds=_embeds(seed + 1, 1, 16, 16),
        prompt_embeds_mask=_padded_mask(16, 11),
        negative_prompt_embeds=_embeds(seed + 2, 1, 16, 16),
        negative_prompt_embeds_mask=_padded_mask(16, 3),
        prompt_embeds_2=_embeds(seed + 3, 1, 8, 32),
        prompt_embeds_mask_2=_padded_mask(8, 5),
        negative_prompt_embeds_2=_embeds(seed + 4, 1, 8, 32),
        negative_prompt_embeds_mask_2=_padded_mask(8, 2),
        height=64,
        width=64,
        num_frames=3,
        num_inference_steps=2,
        output_type="latent",
    )
    return pipe, kwargs


def _minimax_h3(seed: int) -> tuple[Any, dict[str, Any]]:
    """MiniMax-H3 has only a modular pipeline: its ``fl2va`` core denoise blocks (layout, keyframe conditioning,
    noise, the two schedules, the loop, unpacking) run here without text encoder or VAEs, on given embeddings and
    one keyframe latent; the call returns the video latents (``output="latents"``)."""
    from diffusers import MiniMaxH3Transformer3DModel
    from diffusers.modular_pipelines.minimax_h3.modular_blocks_minimax_h3 import MiniMaxH3FL2VACoreDenoiseStep
    from diffusers.schedulers import MiniMaxH3Scheduler

    torch.manual_seed(seed)
    transformer = MiniMaxH3Transformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        ffn_dim=64,
        text_dim=16,
        freq_dim=16,
        time_embed_hidden_dim=32,
        time_embed_dim=16,
        rope_freq_dim=2,
    )
    pipe = MiniMaxH3FL2VACoreDenoiseStep().init_pipeline()
    pipe.update_components(
        transformer=transformer,
        scheduler=MiniMaxH3Scheduler(shift=12.0),
        audio_scheduler=MiniMaxH3Scheduler(shift=3.0),
    )
    # 124 frames (the shortest clip, 5 s at 24 fps) at 128 x 448 -> 37 latent frames of 8 x 28, patch (1, 2, 2):
    # the packed sequence is 8 text rows (three tagged video, as a keyframe's vision block is), 56 keyframe rows
    # anchored first, 414 audio rows (207 latents x 2 channels) and 2,072 target video rows (37 x 4 x 14): 2,550
    # rows, the 478 before the target video (kept dense) under a fifth. Three sigmas make two forwards.
    kwargs = dict(
        prompt_embeds=_embeds(seed + 1, 1, 8, 16),
        text_token_tags=torch.tensor([1, 1, 0, 0, 0, 1, 1, 1]),
        condition_latents=[_embeds(seed + 2, 1, 24, 1, 8, 28)],
        keyframe_anchors=("first",),
        height=128,
        width=448,
        num_frames=124,
        num_inference_steps=3,
        output="latents",
    )
    return pipe, kwargs


TINY_FAMILIES: dict[str, Callable[[int], tuple[Any, dict[str, Any]]]] = {
    "wan": _wan,
    "wan_i2v": _wan_i2v,
    "wan22": _wan22,
    "cogvideox": _cogvideox,
    "hunyuan_video": _hunyuan_video,
    "ltx_video": _ltx_video,
    "pixart": _pixart,
    "flux": _flux,
    "wan_vace": _wan_vace,
    "wan_animate": _wan_animate,
    "skyreels_v2": _skyreels_v2,
    "skyreels_v2_df": _skyreels_v2_df,
    "flux2": _flux2,
    "cosmos": _cosmos,
    "mochi": _mochi,
    "ltx2_video": _ltx2_video,
    "hunyuan_video15": _hunyuan_video15,
    "minimax_h3": _minimax_h3,
}


def tiny_pipeline(family: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A tiny random-weight pipeline of ``family`` and the keyword arguments to call it with."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family={family!r} is unknown; available: {', '.join(TINY_FAMILIES)}")
    pipe, kwargs = TINY_FAMILIES[family](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs
