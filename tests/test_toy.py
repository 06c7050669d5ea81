"""The toy model: data that says what it draws, a pipeline that loads and renders, a training step that learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dit_accel.toy.data import (
    COLORS,
    DIR_VEC,
    HELD_OUT,
    caption,
    centroid_track,
    make_batch,
    make_sample,
    motion_direction,
    render,
    sample_scene,
    segment_color,
)
from dit_accel.toy.model import build_scheduler, build_text_encoder, build_transformer, flow_matching_loss
from dit_accel.toy.pipeline import ToyVideoPipeline
from dit_accel.toy.text import VOCAB, ToyTextEncoder

ASSET = Path(__file__).resolve().parents[1] / "assets" / "toy-wan"
TINY = {
    "dim": 32,
    "heads": 1,
    "layers": 1,
    "ffn_dim": 64,
    "patch_size": [1, 4, 4],
    "freq_dim": 16,
    "text_dim": 16,
    "text_layers": 1,
    "text_heads": 2,
    "text_ffn_dim": 32,
    "max_length": 24,
    "flow_shift": 3.0,
}


def test_generator_is_deterministic() -> None:
    a, ca = make_sample(7, 3, 8, 32, 32)
    b, cb = make_sample(7, 3, 8, 32, 32)
    c, _ = make_sample(7, 4, 8, 32, 32)
    assert ca == cb and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0


def test_captions_use_the_vocabulary_and_exclude_held_out() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng, 8, 32, 32)
        words = caption(scene).split()
        assert set(words) <= set(VOCAB), caption(scene)
        assert len(words) <= 24
        assert all((o.color, o.shape, o.motion) not in HELD_OUT for o in scene.objects)


def _world_track(scene, track: np.ndarray) -> np.ndarray:
    """Undo the camera pan so the track is in the world frame the caption talks about."""
    offs = np.array([scene.camera_offset(t) for t in range(scene.frames)])
    return track + offs


@pytest.mark.parametrize("size", [(8, 32, 32), (16, 64, 64)])
def test_generator_draws_what_it_describes(size: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    checked = 0
    while checked < 40:
        scene = sample_scene(rng, *size, two_object_prob=0.0, pan_prob=0.5, allow_held_out=True)
        obj = scene.objects[0]
        text = caption(scene)
        assert f"a {obj.color} {obj.shape}" in text
        video = render(scene)
        mask = segment_color(video, obj.color)
        assert (mask.sum((1, 2)) > 10).all(), f"{obj.color} not visible in every frame: {text}"
        if obj.motion in DIR_VEC:
            assert f"moves {obj.motion}" in text
            assert motion_direction(_world_track(scene, centroid_track(mask))) == obj.motion, text
            checked += 1
        elif obj.motion == "grows":
            area = mask.sum((1, 2))
            assert area[-1] > 1.8 * area[0], text
        elif obj.motion == "rotates" and scene.pan is None:
            track = centroid_track(mask)
            assert np.abs(track - track[0]).max() < 1.5, text  # spins in place
    # Every palette colour is separable from every background tone.
    for name, rgb in COLORS.items():
        px = np.asarray(rgb, dtype=np.float32).reshape(1, 1, 1, 3)
        assert segment_color(px, name).all()
        assert not segment_color(np.full((1, 1, 1, 3), 0.4, np.float32), name).any()


def test_two_object_scenes_show_both_colours() -> None:
    rng = np.random.default_rng(2)
    for _ in range(10):
        scene = sample_scene(rng, 8, 32, 32, two_object_prob=1.0)
        video = render(scene)
        assert " and " in caption(scene)
        for obj in scene.objects:
            assert segment_color(video, obj.color).any(axis=(1, 2)).mean() > 0.5, caption(scene)


def test_text_encoder_tokenizes_and_zeroes_padding() -> None:
    enc = ToyTextEncoder(embed_dim=16, num_heads=2, ffn_dim=32)
    ids, mask = enc.tokenize(["a red circle moves left over a plain background", "", "a purple blob"])
    assert mask[0].sum() == 9 and not mask[1].any()
    assert ids[2, 1] == VOCAB.index("<unk>")
    out = enc(ids, mask)
    assert out.shape == (3, 24, 16) and torch.isfinite(out).all()
    assert out[1].abs().max() == 0 and out[0, 9:].abs().max() == 0


def _tiny_pipeline() -> ToyVideoPipeline:
    torch.manual_seed(0)
    return ToyVideoPipeline(build_transformer(TINY), build_text_encoder(TINY), build_scheduler(TINY))


def test_pipeline_roundtrip_and_wan_style_cfg_calls(tmp_path: Path) -> None:
    pipe = _tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = ToyVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    calls: list[tuple[str, int, int]] = []
    orig = loaded.transformer.cache_context

    def spy(name: str, **kw: object):
        calls.append((name, kw["step_index"], kw["num_inference_steps"]))
        return orig(name, **kw)

    loaded.transformer.cache_context = spy
    kw = {"num_frames": 4, "height": 16, "width": 16, "num_inference_steps": 3}
    out = loaded("a red circle moves left", generator=torch.Generator().manual_seed(0), **kw).frames
    ref = pipe("a red circle moves left", generator=torch.Generator().manual_seed(0), **kw).frames
    assert out.shape == (1, 4, 16, 16, 3)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert calls == [(n, i, 3) for i in range(3) for n in ("cond", "uncond")]
    pt = loaded(["a", "b"], output_type="pt", guidance_scale=1.0, **kw).frames
    assert pt.shape == (2, 4, 3, 16, 16)
    lat = loaded("a", output_type="latent", **kw).frames
    assert lat.shape == (1, 3, 4, 16, 16)
    with pytest.raises(ValueError, match="height=15"):
        loaded("a", num_frames=4, height=15, width=16)


@pytest.mark.skipif(not (ASSET / "model_index.json").exists(), reason="trained toy model not present")
def test_shipped_model_loads_and_renders() -> None:
    pipe = ToyVideoPipeline.from_pretrained(ASSET)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    frames = pipe(
        "a red circle moves right over a plain background",
        num_frames=4,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert frames.shape == (1, 4, 32, 32, 3)
    assert np.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1


def test_one_training_step_reduces_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    tf, te = build_transformer(TINY), build_text_encoder(TINY)
    x0, prompts = make_batch(0, 0, 2, 4, 16, 16)
    x0 = torch.from_numpy(x0)

    def loss() -> torch.Tensor:
        return flow_matching_loss(tf, te, x0, prompts, 3.0, torch.Generator().manual_seed(0))

    opt = torch.optim.Adam(list(tf.parameters()) + list(te.parameters()), lr=1e-3)
    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()
