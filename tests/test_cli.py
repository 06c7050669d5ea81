"""The command line: render writes a readable video; bad input gives a clear message and a non-zero exit."""

from __future__ import annotations

import imageio.v2 as imageio
import numpy as np
import pytest
from typer.testing import CliRunner

import dit_accel
from dit_accel.cli import app
from dit_accel.render import write_video

runner = CliRunner()
SMALL = ["--model", "tiny-wan", "--steps", "2", "--frames", "5", "--height", "128", "--width", "128"]


def test_info_lists_methods():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0
    for method in dit_accel.METHODS:
        assert method in result.output


def test_render_writes_mp4_with_requested_frames(tmp_path):
    out = tmp_path / "clip.mp4"
    result = runner.invoke(
        app, ["render", *SMALL, "--sparsity", "0.5", "--option", "min_tokens=0", "--no-progress", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "speed-up estimate" in result.output and "an estimate" in result.output
    assert "sparse" in result.output
    reader = imageio.get_reader(out)
    frames = [frame for frame in reader]
    assert len(frames) == 5 and frames[0].shape == (128, 128, 3)


def test_write_video_gif_and_png_frames(tmp_path):
    frames = np.random.default_rng(0).random((3, 16, 16, 3))
    gif = write_video(frames, tmp_path / "a.gif", fps=4)
    assert len(imageio.mimread(gif)) == 3
    folder = write_video(frames, tmp_path / "frames", fps=4)
    assert sorted(p.name for p in folder.iterdir()) == ["frame_0000.png", "frame_0001.png", "frame_0002.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no/such-model"], "not in the local Hugging Face cache"),
        (["--model", "./missing-dir"], "no such directory"),
        (["--model", "tiny-nope"], "built-in tiny models are"),
        (["--model", "tiny-wan", "--height", "100"], "needs multiples of 16"),
        (["--model", "tiny-wan", "--frames", "6"], "needs 1 + a multiple of 4"),
        (["--model", "tiny-wan", "--method", "nope"], "method='nope' is unknown"),
        (["--model", "tiny-wan", "--sparsity", "1.5"], "sparsity=1.5"),
        (["--model", "tiny-wan", "--option", "bogus=1"], "unknown option"),
    ],
)
def test_render_bad_input(tmp_path, args, message):
    result = runner.invoke(app, ["render", *args, "--out", str(tmp_path / "v.mp4")])
    assert result.exit_code != 0
    assert message in result.output


def test_render_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["render", "--model", "tiny-wan", "--out", str(blocker / "v.mp4")])
    assert result.exit_code != 0 and "cannot write" in result.output


def test_sweep_bad_input(tmp_path):
    result = runner.invoke(app, ["sweep", "--model", "tiny-wan", "--methods", "nope", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown" in result.output
    result = runner.invoke(app, ["sweep", "--sparsity", "a,b", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "comma-separated" in result.output
    result = runner.invoke(
        app, ["sweep", "--model", "tiny-wan", "--methods", "blocktopk", "--height", "100", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "needs multiples of 16" in result.output
