"""The toy model: data that says what it draws, a pipeline that loads and renders, a training step that learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dit_accel.toy.data import (
    BG_TONES,
    COLORS,
    DIR_VEC,
    HELD_OUT,
    ObjectSpec,
    SceneSpec,
    caption,
    centroid_track,
    make_batch,
    make_sample,
    motion_direction,
    render,
    render_batch,
    sample_batch,
    sample_scene,
    segment_color,
)
from dit_accel.toy.model import (
    build_scheduler,
    build_text_encoder,
    build_transformer,
    coordinate_planes,
    flow_matching_loss,
    model_input,
)
from dit_accel.toy.pipeline import ToyVideoPipeline
from dit_accel.toy.text import VOCAB, ToyTextEncoder, ToyVocabularyWarning

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


def test_batched_drawing_matches_one_scene_at_a_time() -> None:
    scenes = sample_batch(3, 0, 12, 6, 24, 32, two_object_prob=0.5, pan_prob=0.5)
    assert {len(s.objects) for s in scenes} == {1, 2} and any(s.pan for s in scenes)
    batch = render_batch(scenes)
    assert batch.shape == (12, 6, 24, 32, 3)
    for scene, video in zip(scenes, batch):
        np.testing.assert_allclose(video.numpy(), render(scene), atol=1e-6)
    x0, prompts = make_batch(3, 0, 12, 6, 24, 32, two_object_prob=0.5, pan_prob=0.5)
    assert x0.shape == (12, 3, 6, 24, 32) and prompts == [caption(s) for s in scenes]
    torch.testing.assert_close(x0, batch.permute(0, 4, 1, 2, 3) * 2 - 1)
    with pytest.raises(ValueError, match="same frames"):
        render_batch([scenes[0], sample_scene(np.random.default_rng(0), 6, 32, 32)])


def test_a_still_circle_is_drawn_where_it_is_and_in_its_colour() -> None:
    obj = ObjectSpec("red", "circle", "grows", x0=12.0, y0=8.0, radius=4.0, growth=1.0)
    scene = SceneSpec(2, 16, 24, "plain", (BG_TONES[0], BG_TONES[1]), (), None, 0.0, (obj,))
    video = render(scene)
    np.testing.assert_allclose(video[:, 8, 12], [COLORS["red"]] * 2, atol=1e-6)  # centre pixel (11.5..12.5)
    np.testing.assert_allclose(video[:, 0, 0], [BG_TONES[0]] * 2, atol=1e-6)
    inside = segment_color(video, "red")[0]
    assert 40 <= inside.sum() <= 60  # area of a radius-4 disc is 50 px


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


def test_text_encoder_names_the_words_it_ignores() -> None:
    enc = ToyTextEncoder(embed_dim=16, num_heads=2, ffn_dim=32)
    assert enc.prompt_problems(["a red circle moves left", ""]) is None
    message = enc.prompt_problems(["a purple blob", "a Purple circle"])
    assert message.startswith("prompt words outside the toy model's vocabulary are ignored: 'purple', 'blob' (")
    assert message.endswith(f"(vocabulary: {' '.join(VOCAB[2:])})")
    long = " ".join(["a red circle moves left"] * 5)  # 25 words: the 25th is past max_length
    assert "reads the first 24 words" in enc.prompt_problems([long])


def test_pipeline_warns_once_per_call_about_ignored_words() -> None:
    pipe = _tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_frames": 1, "height": 8, "width": 8, "num_inference_steps": 1}
    with pytest.warns(ToyVocabularyWarning, match="'purple', 'cat', 'blurry'") as record:
        pipe("a purple cat", negative_prompt="blurry", **kw)
    assert len(record) == 1 and record[0].filename == __file__  # points at the pipe(...) call


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

    def loss() -> torch.Tensor:
        return flow_matching_loss(tf, te, x0, prompts, 3.0, torch.Generator().manual_seed(0))

    opt = torch.optim.Adam(list(tf.parameters()) + list(te.parameters()), lr=1e-3)
    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_train_script_is_reproducible_with_and_without_data_workers(tmp_path: Path) -> None:
    """Three steps of scripts/train_toy.py on a tiny config: the worker path draws the same batches as the inline
    one (same losses), and the exported directory loads as a pipeline."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    config = json.loads((root / "configs" / "toy.json").read_text())
    config["model"] = TINY
    config["train"] |= {"ckpt_every": 2, "log_every": 2}
    config["budgets"] = {
        "tiny": {"threads": 1, "phases": [{"steps": 3, "batch": 2, "frames": 4, "height": 16, "width": 16}]}
    }
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    logs = []
    for workers in (0, 1):
        out = tmp_path / f"model{workers}"
        cmd = [sys.executable, str(root / "scripts" / "train_toy.py"), "--config", str(tmp_path / "tiny.json"),
               "--budget", "tiny", "--device", "cpu", "--workers", str(workers), "--out", str(out),
               "--state-dir", str(tmp_path / f"state{workers}")]  # fmt: skip
        run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        logs.append(json.loads((out / "train_log.json").read_text()))
    assert logs[0]["steps_done"] == 3 and len(logs[0]["losses"]) == 3
    assert logs[0]["losses"] == logs[1]["losses"]
    pipe = ToyVideoPipeline.from_pretrained(tmp_path / "model1")
    assert pipe.transformer.config.num_layers == 1


def test_word_influence_is_zero_for_a_word_the_model_cannot_see(capsys: pytest.CaptureFixture) -> None:
    from dit_accel.toy.probe import WORD_CLASSES, word_influence

    torch.manual_seed(0)
    tf, te = build_transformer(TINY).eval(), build_text_encoder(TINY).eval()
    with torch.no_grad():  # all four direction words share one embedding: the direction is invisible
        rows = [te.word_to_id[w] for w in ("left", "right", "up", "down")]
        te.embed.weight[rows] = te.embed.weight[rows[0]].clone()
    scenes = [("red", "circle", "left", "plain"), ("blue", "ring", "up", "striped")]
    out = word_influence(tf, te, scenes, size=(4, 16, 16), sigmas=(0.9, 0.5))
    assert list(out) == ["sigma_0.9", "sigma_0.5"]
    for per_class in out.values():
        assert list(per_class) == list(WORD_CLASSES)
        assert per_class["direction"] == 0.0
        assert per_class["colour"] > 0 and per_class["background"] > 0
    with pytest.raises(ValueError, match="scenes must hold at least one"):  # was a ZeroDivisionError
        word_influence(tf, te, [], size=(4, 16, 16))
    eval_toy = _script("eval_toy")
    with pytest.raises(SystemExit):  # refused before any model is loaded
        eval_toy.main(["--influence-prompts", "0"])
    assert "--influence-prompts must be at least 1, got 0" in capsys.readouterr().err


def test_prompt_dropout_equals_training_on_the_empty_prompt() -> None:
    """CFG dropout zeroes the dropped rows' embeddings on the device; that must equal encoding "" for those rows."""
    torch.manual_seed(0)
    tf, te = build_transformer(TINY), build_text_encoder(TINY)
    x0, prompts = make_batch(1, 0, 6, 4, 16, 16)
    keep = torch.rand(6, generator=torch.Generator().manual_seed(5)) >= 0.5  # the draw the loss makes first
    assert 0 < int(keep.sum()) < 6
    emptied = [p if k else "" for p, k in zip(prompts, keep.tolist())]
    with torch.no_grad():
        dropped = flow_matching_loss(tf, te, x0, prompts, 3.0, torch.Generator().manual_seed(5), cond_drop=0.5)
        by_hand = flow_matching_loss(tf, te, x0, emptied, 3.0, torch.Generator().manual_seed(5), cond_drop=0.5)
    torch.testing.assert_close(dropped, by_hand, rtol=0, atol=0)


def test_motion_weights_and_speed_range_set_the_data_mix():
    from dit_accel.toy.data import DIRECTIONS, sample_scene

    rng = np.random.default_rng(0)
    scenes = [
        sample_scene(rng, 8, 64, 64, two_object_prob=0.0, motion_weights=(1, 1, 1, 1, 0, 0, 0), speed_range=(2.0, 2.0))
        for _ in range(40)
    ]
    assert {s.objects[0].motion for s in scenes} == set(DIRECTIONS)
    assert all(abs(s.objects[0].speed - 2.0) < 1e-9 for s in scenes)  # 2 px/frame fits a 64 px canvas
    with pytest.raises(ValueError, match="motion_weights"):
        sample_scene(rng, 8, 32, 32, motion_weights=(1, 1, 1))


ROOT = Path(__file__).resolve().parents[1]


def test_fixed_background_variety_gives_each_background_word_one_look_and_keeps_the_objects():
    """``background_variety="fixed"``: the same scene stream (objects, words, pans) with the unnamed background
    draws (tones, period, orientation, gradient angle) replaced by one look per word; random is the default."""
    from dit_accel.toy.data import FIXED_BG_PARAMS, FIXED_BG_TONES

    def stream(**kw):
        rng = np.random.default_rng(7)
        return [sample_scene(rng, 8, 32, 32, **kw) for _ in range(30)]

    rand, fixed = stream(), stream(background_variety="fixed")
    assert [s.objects for s in rand] == [s.objects for s in fixed]
    assert [(s.background, s.pan) for s in rand] == [(s.background, s.pan) for s in fixed]
    assert all(s.bg_colors == FIXED_BG_TONES and s.bg_param == FIXED_BG_PARAMS[s.background] for s in fixed)
    assert len({(s.bg_colors, s.bg_param) for s in rand if s.background == "striped"}) > 1
    by_word = {}  # one look per word: the rendered first frame of every striped clip is the same
    for s in fixed:
        if s.pan is None:
            by_word.setdefault(s.background, []).append(render(SceneSpec(**{**s.__dict__, "objects": ()}))[0])
    assert all(np.array_equal(frames[0], f) for frames in by_word.values() for f in frames)
    with pytest.raises(ValueError, match="background_variety='noisy'"):
        sample_scene(np.random.default_rng(0), 8, 32, 32, background_variety="noisy")


def test_attention_probe_reads_a_uniform_map_as_unstructured():
    """With q = 0 every softmax row is uniform: the window share equals the uniform share (ratio 1) and the top
    tenth of the keys holds exactly a tenth of the mass; a real map must then score above both."""
    from dit_accel.toy.probe import AttentionProbe

    torch.manual_seed(0)
    tf = build_transformer(TINY).eval()
    grid, x = (2, 4, 5), torch.randn(1, 3, 2, 16, 20)  # 40 tokens: the top tenth is 4 keys
    t, text = torch.full((1,), 500.0), torch.randn(1, 24, TINY["text_dim"])

    def summary():
        probe = AttentionProbe(tf, half=(0, 1, 1))
        with probe.attached(grid), torch.no_grad():
            tf(model_input(tf, x), t, text, return_dict=False)
        return probe.summary()["layers"][0]

    trained = summary()
    with torch.no_grad():
        tf.blocks[0].attn1.to_q.weight.zero_()
        tf.blocks[0].attn1.to_q.bias.zero_()
    uniform = summary()
    assert uniform["ratio_to_uniform"] == pytest.approx(1.0, abs=0.01)
    assert uniform["top10_mass"] == pytest.approx(0.1, abs=1e-3)
    assert trained["top10_mass"] > 0.1 + 1e-3


def _script(name: str):
    """``scripts/<name>.py`` loaded as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_phase_sets_its_own_data_mix_and_a_budget_its_own_train_and_model_settings(tmp_path: Path) -> None:
    """Curriculum knobs: a phase's motion_weights / two_object_prob / pan_prob / speed_range override the train
    section's for that phase only, and a budget's "train" entries override the train section (its lr, ...)."""
    import json

    train_toy = _script("train_toy")
    config = json.loads((ROOT / "configs" / "toy.json").read_text())
    config["model"] = TINY
    directional = {"motion_weights": [1, 1, 1, 1, 0, 0, 0], "two_object_prob": 0.0, "pan_prob": 0.0}
    phases = [
        {"steps": 2, "batch": 2, "frames": 4, "height": 16, "width": 16, **directional},
        {"steps": 2, "batch": 2, "frames": 4, "height": 16, "width": 16},
    ]
    trainer = train_toy.Trainer(config, torch.device("cpu"), phases)
    first, second = trainer.batch_args(0)[1], trainer.batch_args(3)[1]
    assert first == {"two_object_prob": 0.0, "pan_prob": 0.0, "motion_weights": (1, 1, 1, 1, 0, 0, 0)}
    assert second == {"two_object_prob": config["train"]["two_object_prob"], "pan_prob": config["train"]["pan_prob"]}
    phases[1]["background_variety"] = "fixed"  # reaches sample_scene only from the phase that sets it
    assert trainer.batch_args(3)[1]["background_variety"] == "fixed" and "background_variety" not in first
    config["budgets"] = {
        "tiny": {
            "threads": 1,
            "model": {"coord_channels": 5},
            "train": {"lr": 0.123, "ckpt_every": 1},
            "phases": phases[:1],
        }
    }
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    args = ["--config", str(tmp_path / "tiny.json"), "--budget", "tiny", "--device", "cpu", "--max-steps", "1",
            "--out", str(tmp_path / "model"), "--state-dir", str(tmp_path / "state")]  # fmt: skip
    assert train_toy.main(args) == 0
    state = torch.load(tmp_path / "state" / "state.pt", weights_only=False)
    want = train_toy.lr_at(0, 2, {**config["train"], "lr": 0.123})
    assert state["opt"]["param_groups"][0]["lr"] == pytest.approx(want) and want > 0
    # the budget's model options build the architecture: 3 pixel channels + 5 planes in, 3 out
    assert state["transformer"]["patch_embedding.weight"].shape[1] == 8
    assert ToyVideoPipeline.from_pretrained(tmp_path / "model").transformer.config.in_channels == 8
    # resuming that state under a budget that builds another architecture is a clear error, not a size mismatch
    config["budgets"]["plain"] = {"threads": 1, "phases": phases[:1]}
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    resume = [a if a != "tiny" else "plain" for a in args] + ["--resume"]
    with pytest.raises(SystemExit, match="does not fit the model that --budget plain builds"):
        train_toy.main(resume)


def test_init_from_starts_a_fresh_run_from_a_trained_models_weights(tmp_path: Path) -> None:
    """A fine-tune (``--init-from``) begins at the given model's weights, live and EMA, with a fresh step count,
    and its history names what the weights had already been through; a model of another shape is a clear error."""
    import json

    train_toy = _script("train_toy")
    config = json.loads((ROOT / "configs" / "toy.json").read_text())
    config["model"] = TINY
    phase = {"steps": 1, "batch": 1, "frames": 4, "height": 16, "width": 16}
    config["budgets"] = {
        "tiny": {"threads": 1, "phases": [phase]},
        "wide": {"threads": 1, "model": {"coord_channels": 5}, "phases": [phase]},
    }
    (tmp_path / "tiny.json").write_text(json.dumps(config))

    def run(name: str, budget: str, *extra: str) -> None:
        args = ["--config", str(tmp_path / "tiny.json"), "--budget", budget, "--device", "cpu",
                "--out", str(tmp_path / name), "--state-dir", str(tmp_path / f"{name}-state"), *extra]  # fmt: skip
        assert train_toy.main(args) == 0

    run("first", "tiny")
    first = ToyVideoPipeline.from_pretrained(tmp_path / "first").transformer.state_dict()
    config["train"]["lr"] = 0.0  # the fine-tune's update then leaves the loaded weights exactly as they were
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    run("second", "tiny", "--init-from", str(tmp_path / "first"))
    second = ToyVideoPipeline.from_pretrained(tmp_path / "second").transformer.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    state = torch.load(tmp_path / "second-state" / "state.pt", weights_only=False)
    assert state["step"] == 1 and len(state["losses"]) == 1
    assert all(torch.equal(state["transformer"][k], first[k]) for k in first)
    assert "initialised from" in state["history"][0] and "1 steps" in state["history"][0]
    with pytest.raises(SystemExit, match="--init-from: .* does not fit the model"):
        run("third", "wide", "--init-from", str(tmp_path / "first"))


def test_coordinate_planes_reach_the_transformer_through_every_toy_path(tmp_path: Path) -> None:
    """A model built with ``coord_channels`` reads its pixels plus the planes in the loss, the pipeline (also after
    a save/load round trip) and the word-influence probe; a wrong width or config value is a clear error."""
    x = torch.zeros(2, 3, 4, 8, 8)
    planes = coordinate_planes(x, 5)
    assert planes.shape == (2, 5, 4, 8, 8)
    t, y, c = planes[0, 0, :, 0, 0], planes[0, 1, 0, :, 0], planes[0, 2, 0, 0, :]
    torch.testing.assert_close(t, torch.linspace(-1, 1, 4))
    torch.testing.assert_close(y, torch.linspace(-1, 1, 8))
    torch.testing.assert_close(c, torch.linspace(-1, 1, 8))
    torch.testing.assert_close(planes[0, 3], planes[0, 0] * planes[0, 1])  # frame x row
    torch.testing.assert_close(planes[0, 4], planes[0, 0] * planes[0, 2])  # frame x column
    torch.manual_seed(0)
    cfg = {**TINY, "coord_channels": 5}
    tf, te = build_transformer(cfg), build_text_encoder(cfg)
    assert tf.config.in_channels == 8 and tf.config.out_channels == 3
    seen: list[torch.Size] = []
    hook = tf.patch_embedding.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    flow_matching_loss(tf, te, torch.zeros(1, 3, 2, 8, 8), ["a red circle"], 3.0, torch.Generator().manual_seed(0))
    pipe = ToyVideoPipeline(tf, te, build_scheduler(cfg))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = ToyVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kw = {"num_frames": 2, "height": 8, "width": 8, "num_inference_steps": 2, "guidance_scale": 1.0}
    ref = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).frames
    out = loaded("a red circle", generator=torch.Generator().manual_seed(0), **kw).frames
    np.testing.assert_allclose(out, ref, atol=1e-6)
    from dit_accel.toy.probe import word_influence

    word_influence(tf, te, [("red", "circle", "left", "plain")], (2, 8, 8), sigmas=(0.9,))
    hook.remove()
    assert seen and all(s[1] == 8 for s in seen)
    with pytest.raises(ValueError, match="coord_channels=4"):
        build_transformer({**TINY, "coord_channels": 4})
    with pytest.raises(ValueError, match="difference must be one of"):
        model_input(tf, torch.zeros(1, 4, 2, 8, 8))


def test_the_card_names_the_hardware_the_run_trained_on() -> None:
    """The card's training line reads the log's hardware (it said "one CPU thread" for a 2-thread run)."""
    import json

    eval_toy = _script("eval_toy")
    ev = json.loads((ASSET / "eval.json").read_text())
    log = {**json.loads((ASSET / "train_log.json").read_text()), "hardware": "CPU, 2 thread(s)"}
    status = eval_toy._status(ev, log)
    assert "on CPU, 2 thread(s)," in status and "one CPU thread" not in status


def test_eval_toy_compares_with_a_random_init_of_the_same_architecture() -> None:
    """eval_toy's random-init baseline is rebuilt from the trained transformer's config: with coordinate planes it
    must read the same 8 input channels, not the plain 3-channel model."""
    eval_toy = _script("eval_toy")
    for coords in (0, 5):
        cfg = {**TINY, "coord_channels": coords}
        pipe = ToyVideoPipeline(build_transformer(cfg), build_text_encoder(cfg), build_scheduler(cfg))
        rebuilt = build_transformer(eval_toy._model_cfg(pipe))
        assert dict(rebuilt.config) == dict(pipe.transformer.config)
