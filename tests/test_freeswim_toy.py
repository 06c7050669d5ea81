"""FreeSwim on the toy (issue 14 item 4): ``FreeSwimPipeline.from_pipe(toy)`` renders above the training size in pixel
space, equals the plain toy where the window covers the frame, leaves the toy as it was, and the CLI's plain-text
summary shows FreeSwim's stats. A tiny random-weight toy on the CPU; each test is a few seconds."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from dit_accel.pipelines import FreeSwimPipeline
from dit_accel.pipelines.freeswim import FreeSwimMixin, maybe_freeswim, upscale_video
from dit_accel.toy.freeswim import ToyFreeSwimPipeline
from dit_accel.toy.model import build_scheduler, build_text_encoder, build_transformer
from dit_accel.toy.pipeline import ToyVideoPipeline
from dit_accel.toy.video2video import ToyVideoToVideoPipeline

TINY = {
    "dim": 32, "heads": 1, "layers": 2, "ffn_dim": 64, "patch_size": [1, 4, 4], "freq_dim": 16, "text_dim": 16,
    "text_layers": 1, "text_heads": 2, "text_ffn_dim": 32, "max_length": 24, "flow_shift": 3.0,
}  # fmt: skip
PROMPT = "a red circle moves right over a striped background"
# patch 4: 64 x 64 px is a 16 x 16 token grid; a 32 x 32 base gives an 8 x 8 window
SIZE, BASE, FRAMES = 64, 32, 2


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy() -> ToyVideoPipeline:
    torch.manual_seed(0)
    pipe = ToyVideoPipeline(build_transformer(TINY), build_text_encoder(TINY), build_scheduler(TINY))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_from_pipe_renders_the_toy_above_its_size(toy) -> None:
    swim = FreeSwimPipeline.from_pipe(toy)
    assert isinstance(swim, ToyFreeSwimPipeline) and isinstance(swim, FreeSwimMixin)
    assert swim.transformer is toy.transformer and swim.text_encoder is toy.text_encoder
    assert swim.scheduler is toy.scheduler
    video = swim(PROMPT, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=4, base_height=BASE,
                 base_width=BASE, cache_every=2, generator=_gen(0)).frames  # fmt: skip
    assert video.shape == (1, FRAMES, SIZE, SIZE, 3) and 0.0 <= video.min() and video.max() <= 1.0
    stats = swim.last_stats
    # the window is the base grid (8 x 8 of 16 x 16 tokens), really sparse, over the refinement's 2 steps
    assert stats["grid"] == [FRAMES, 16, 16] and stats["window"] == [FRAMES, 8, 8]
    assert stats["window_block_density"] < 0.5 and stats["window_calls"] == 2 * 2 * len(toy.transformer.blocks)
    assert stats["steps"] == 2 and stats["guide_steps"] == [0] and stats["size"] == [SIZE, SIZE]
    assert stats["attn2_reused"] == 2 * len(toy.transformer.blocks)
    # the other output types: frames as (B, F, 3, H, W), latents as the pixel-space clip (B, 3, F, H, W)
    kw = dict(height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=2, base_height=BASE, base_width=BASE)
    assert swim(PROMPT, output_type="pt", **kw).frames.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert swim(PROMPT, output_type="latent", **kw).frames.shape == (1, 3, FRAMES, SIZE, SIZE)
    with pytest.raises(ValueError, match="cache_evry: not a FreeSwim option; allowed: strength, cache_every"):
        swim(PROMPT, cache_evry=2, **kw)


def _full_window(**extra):
    """FreeSwim made equal to dense: the window covers the 16 x 16 grid, the full branch runs every step (so its
    cross-attention, which overrides the window branch's, is of this step) and the softmax scale is the model's."""
    return dict(base_height=BASE, base_width=BASE, window_size=(16, 16), cache_every=1, attention_scale=False, **extra)


def test_full_window_at_strength_1_equals_the_plain_toy_at_that_size(toy) -> None:
    swim = FreeSwimPipeline.from_pipe(toy)
    kw = dict(num_frames=FRAMES, num_inference_steps=4, output_type="latent")
    ours = swim(PROMPT, height=SIZE, width=SIZE, generator=_gen(3), **kw, **_full_window(strength=1.0)).frames
    assert swim.last_stats["window_block_density"] == pytest.approx(1.0)
    assert swim.last_stats["full_forwards"] == 4
    # the reference: the plain toy at 64 x 64 from the noise the refinement starts from (strength 1 keeps no base)
    gen = _gen(3)
    toy(PROMPT, height=BASE, width=BASE, generator=gen, **kw)  # the base pass draws its noise first
    noise = randn_tensor((1, 3, FRAMES, SIZE, SIZE), generator=gen, dtype=torch.float32)
    plain = toy(PROMPT, height=SIZE, width=SIZE, latents=noise, **kw).frames
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)
    # control: the real window (8 x 8 of 16 x 16) changes the result, so the comparison above can fail
    windowed = swim(PROMPT, height=SIZE, width=SIZE, generator=_gen(3), **kw, base_height=BASE, base_width=BASE,
                    strength=1.0, cache_every=1, attention_scale=False).frames  # fmt: skip
    assert (windowed - plain).abs().max() > 1e-3


def test_full_window_equals_base_upscale_and_plain_pixel_space_refinement(toy) -> None:
    swim = FreeSwimPipeline.from_pipe(toy)
    kw = dict(num_frames=FRAMES, num_inference_steps=6, output_type="latent")
    ours = swim(PROMPT, height=SIZE, width=SIZE, generator=_gen(5), **kw, **_full_window(strength=0.5)).frames
    assert swim.last_stats["steps"] == 3
    gen = _gen(5)
    base = toy(PROMPT, height=BASE, width=BASE, generator=gen, **kw).frames
    v2v = ToyVideoToVideoPipeline(toy.transformer, toy.text_encoder, build_scheduler(TINY))
    v2v.set_progress_bar_config(disable=True)
    upscaled = upscale_video(base.clamp(-1, 1), SIZE, SIZE)
    ref = v2v(upscaled, PROMPT, strength=0.5, generator=gen, num_inference_steps=6, output_type="latent").frames
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ref, upscale_video(base, SIZE, SIZE), atol=1e-2)  # the refinement did something


def test_video_to_video_finishes_the_text_to_video_trajectory(toy) -> None:
    # Denoising the last half of a trajectory from its midpoint gives the same end: strength picks the steps.
    steps, kept = 6, []
    kw = dict(height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=steps, output_type="latent")

    def keep(pipe, i, t, tensors):
        kept.append(tensors["latents"].clone())
        return tensors

    full = toy(PROMPT, generator=_gen(7), callback_on_step_end=keep, **kw).frames
    v2v = ToyVideoToVideoPipeline(toy.transformer, toy.text_encoder, build_scheduler(TINY))
    v2v.set_progress_bar_config(disable=True)
    calls = []
    handle = toy.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        # 3 of 6 steps: from step 3 on; the size is the clip's
        tail = v2v(prompt=PROMPT, latents=kept[2], strength=0.5, num_inference_steps=steps, output_type="latent").frames
    finally:
        handle.remove()
    assert len(calls) == 3 * 2  # three steps, conditional and unconditional
    torch.testing.assert_close(tail, full, atol=1e-6, rtol=1e-5)
    # a clip is its own latent: the first model input is the clip noised to the first kept step, nothing else
    clip = torch.rand(1, 3, FRAMES, SIZE, SIZE, generator=_gen(8)) * 2 - 1
    inputs = []
    handle = toy.transformer.register_forward_pre_hook(
        lambda m, a, k: inputs.append(k["hidden_states"]), with_kwargs=True
    )
    try:
        v2v(clip, PROMPT, strength=0.5, num_inference_steps=steps, generator=_gen(9), output_type="latent")
    finally:
        handle.remove()
    sigma = v2v.scheduler.sigmas[3]
    noise = randn_tensor(clip.shape, generator=_gen(9), dtype=torch.float32)
    torch.testing.assert_close(inputs[0], sigma * noise + (1 - sigma) * clip)
    with pytest.raises(ValueError, match=r"video=\(1, 3, 8, 8\)"):
        v2v(torch.zeros(1, 3, 8, 8), PROMPT)
    with pytest.raises(ValueError, match="strength=0"):
        v2v(torch.zeros(1, 3, 1, 8, 8), PROMPT, strength=0)


def _hook_names(module: torch.nn.Module) -> set[str]:
    return {
        name for mod in module.modules() for name in getattr(getattr(mod, "_diffusers_hook", None), "hooks", {})
    }  # fmt: skip


def test_the_toy_pipeline_is_unchanged_afterwards(toy) -> None:
    kw = dict(height=BASE, width=BASE, num_frames=FRAMES, num_inference_steps=3, output_type="latent")
    before = toy(PROMPT, generator=_gen(1), **kw).frames
    weights = {k: v.clone() for k, v in toy.transformer.state_dict().items()}
    config, hooks = dict(toy.scheduler.config), _hook_names(toy.transformer)
    swim = FreeSwimPipeline.from_pipe(toy)
    swim(PROMPT, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=4, base_height=BASE,
         base_width=BASE, refine_shift=9.0, output_type="latent", generator=_gen(2))  # fmt: skip
    assert swim.transformer is toy.transformer and swim.scheduler is toy.scheduler
    assert dict(toy.scheduler.config) == config  # the refinement's shift went to its own scheduler
    assert _hook_names(toy.transformer) == hooks  # FreeSwim's hooks are off again
    after = toy(PROMPT, generator=_gen(1), **kw).frames
    assert torch.equal(after, before)
    assert all(torch.equal(v, weights[k]) for k, v in toy.transformer.state_dict().items())
    assert toy._progress_bar_config == swim._progress_bar_config == {"disable": True}


def test_from_pipe_keeps_the_dtype_of_the_shared_modules(toy) -> None:
    toy.transformer.to(torch.bfloat16)  # diffusers' from_pipe would cast every shared module to float32
    swim = FreeSwimPipeline.from_pipe(toy)
    assert toy.transformer.dtype == torch.bfloat16 and toy.text_encoder.dtype == torch.float32
    assert swim.transformer is toy.transformer
    FreeSwimPipeline.from_pipe(toy, dtype=torch.float32)  # asked for: cast, as diffusers does
    assert toy.transformer.dtype == torch.float32


def test_maybe_freeswim_takes_the_toy_and_its_default_size(toy) -> None:
    swim, kw = maybe_freeswim(toy, {"prompt": PROMPT}, BASE, None, strength=0.5, cache_every=None)
    assert isinstance(swim, ToyFreeSwimPipeline) and swim.transformer is toy.transformer
    # the target is the toy's own default (64 x 64), not Wan's 480 x 832
    assert (kw["height"], kw["width"], kw["base_height"], kw["base_width"]) == (64, 64, BASE, 64)
    assert kw["strength"] == 0.5 and "cache_every" not in kw
    same, kw = maybe_freeswim(toy, {"height": 64}, 64, 64)
    assert same is toy and "base_height" not in kw


def test_cli_render_on_the_toy_prints_freeswim_stats(toy, tmp_path) -> None:
    from typer.testing import CliRunner

    from dit_accel.cli import app

    toy.save_pretrained(tmp_path / "toy")
    args = ["render", "--model", str(tmp_path / "toy"), "--steps", "2", "--frames", str(FRAMES), "--height",
            str(SIZE), "--width", str(SIZE), "--base-height", str(BASE), "--base-width", str(BASE),
            "--cache-every", "1", "--strength", "1", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.gif")])
    assert result.exit_code == 0, result.output
    text = result.output
    blocks = len(toy.transformer.blocks)
    assert "attention calls (base pass):" in text
    assert (
        "FreeSwim: 64 x 64 from a 32 x 32 base; refinement 2 steps (strength 1.0), guide steps 0, 1 (cache every 1)"
    ) in text
    assert (
        f"FreeSwim window branch: 4 forwards, {4 * blocks} windowed self-attention calls "
        f"(window {FRAMES} x 8 x 8 of grid {FRAMES} x 16 x 16 tokens, kept block density"
    ) in text
    assert f"FreeSwim full branch: 2 forwards, {2 * blocks} dense self-attention calls" in text
    assert (
        f"FreeSwim cross-attention cache: {2 * blocks} computed by the full branch, {2 * blocks} reused by the "
        f"window branch, {2 * blocks} computed by the unconditional pass; peak"
    ) in text
    as_json = CliRunner().invoke(app, [*args, "--json", "--out", str(tmp_path / "b.gif")])
    summary = json.loads(as_json.output[as_json.output.index("{") :])
    assert summary["freeswim"]["guide_steps"] == [0, 1] and (tmp_path / "b.gif").exists()


def test_from_pipe_renders_a_toy_that_reads_coordinate_planes() -> None:
    """A toy with ``coord_channels`` reads 3 pixel channels plus planes: FreeSwim's refinement (the video-to-video
    pipeline) takes and returns 3-channel clips, not ``in_channels`` ones."""
    torch.manual_seed(0)
    cfg = {**TINY, "coord_channels": 5}
    toy = ToyVideoPipeline(build_transformer(cfg), build_text_encoder(cfg), build_scheduler(cfg))
    toy.set_progress_bar_config(disable=True)
    swim = FreeSwimPipeline.from_pipe(toy)
    video = swim(PROMPT, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=4, base_height=BASE,
                 base_width=BASE, cache_every=2, generator=_gen(0)).frames  # fmt: skip
    assert video.shape == (1, FRAMES, SIZE, SIZE, 3) and torch.isfinite(torch.as_tensor(video)).all()
    with pytest.raises(ValueError, match=r"expected a \(B, 3, F, H, W\)"):
        ToyVideoToVideoPipeline.from_pipe(toy)(torch.zeros(1, 8, FRAMES, BASE, BASE), PROMPT, num_inference_steps=2)
