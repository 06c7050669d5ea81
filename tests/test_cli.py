"""The command line: render writes a readable video; bad input gives a clear message and a non-zero exit."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import dit_accel
from dit_accel.cli import app
from dit_accel.render import default_model, write_video

runner = CliRunner()
SMALL = ["--model", "tiny-wan", "--steps", "2", "--frames", "5", "--height", "128", "--width", "128"]
ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "assets" / "toy-wan"
needs_toy = pytest.mark.skipif(not (TOY / "model_index.json").exists(), reason="trained toy model not present")
#: the smallest render of the shipped toy model (patch 4 x 4): one step, one 16 x 16 frame
TOY_TINY = ["--model", str(TOY), "--steps", "1", "--frames", "1", "--height", "16", "--width", "16", "--no-progress"]


def _one_error_line(result) -> str:
    """A refused command: exit code 2, no traceback, one ``error:`` line (returned)."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


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
    assert "wrote" in result.output and "FLOP estimate (not a measurement" in result.output
    assert "--compare-dense measures it" in result.output and "measured on" not in result.output
    assert "sparse" in result.output
    reader = imageio.get_reader(out)
    frames = [frame for frame in reader]
    assert len(frames) == 5 and frames[0].shape == (128, 128, 3)


def test_compare_dense_prints_the_measured_speedup(tmp_path):
    out = tmp_path / "clip.gif"
    args = ["render", *SMALL, "--method", "blocktopk", "--sparsity", "0.5", "--option", "min_tokens=0"]
    args += ["--no-progress", "--out", str(out)]
    result = runner.invoke(app, [*args, "--compare-dense", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["device"] == "cpu" and summary["dense_seconds"] > 0
    assert summary["measured_speedup"] == pytest.approx(summary["dense_seconds"] / summary["seconds"])
    assert 0 < summary["psnr_vs_dense"] < 100  # half the blocks skipped: close to dense, not identical
    text = runner.invoke(app, [*args, "--compare-dense"]).output
    assert "measured on cpu: dense" in text and "PSNR against dense" in text


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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps 0: must be an integer >= 1"),
        (["--steps", "-3"], "--steps -3: must be an integer >= 1"),
        (["--frames", "0"], "--frames 0: must be an integer >= 1"),
        (["--height", "0"], "--height 0: must be an integer >= 1"),
        (["--width", "-16"], "--width -16: must be an integer >= 1"),
        (["--fps", "0"], "--fps 0: must be an integer >= 1"),
        (["--guidance-scale", "-1"], "--guidance-scale -1.0: must be a finite number >= 0"),
        (["--guidance-scale", "nan"], "--guidance-scale nan: must be a finite number >= 0"),
        (["--base-height", "0"], "--base-height 0: must be an integer >= 1"),
        (["--cache-every", "0"], "--cache-every 0: must be an integer >= 1"),
        (["--strength", "0"], "--strength 0.0: must be in (0, 1]"),
    ],
)
def test_render_refuses_out_of_range_numbers(tmp_path, args, message):
    # issue 15: `--steps 0` used to render 0 denoising steps and write the initial noise, with exit code 0
    out = tmp_path / "v.mp4"
    result = runner.invoke(app, ["render", "--model", "tiny-wan", *args, "--no-progress", "--out", str(out)])
    assert _one_error_line(result) == f"error: {message}"
    assert not out.exists()


@pytest.mark.parametrize("name", ["x.avi", "x.webm", "clip.MOV"])
def test_render_refuses_an_unknown_out_suffix(tmp_path, name):
    # issue 15: `--out x.avi` used to make a folder named x.avi full of PNGs
    out = tmp_path / name
    line = _one_error_line(runner.invoke(app, ["render", *SMALL, "--no-progress", "--out", str(out)]))
    assert "--out" in line and f"unsupported suffix '{out.suffix}'" in line
    for supported in (".mp4", ".gif", ".png", "folder"):
        assert supported in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unsupported suffix"):  # the library function refuses it too
        write_video(np.zeros((2, 8, 8, 3)), out, fps=4)
    assert not out.exists()


def test_render_png_is_one_frame_and_folders_stay_folders(tmp_path):
    out = tmp_path / "still.png"
    result = runner.invoke(app, ["render", *SMALL[:2], "--steps", "1", "--frames", "1", "--height", "32",
                                 "--width", "32", "--no-progress", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert imageio.imread(out).shape == (32, 32, 3)
    many = tmp_path / "many.png"
    line = _one_error_line(runner.invoke(app, ["render", *SMALL, "--no-progress", "--out", str(many)]))
    assert "a .png holds one frame" in line and "5" in line and not many.exists()
    folder = write_video(np.zeros((2, 8, 8, 3)), str(tmp_path / "v1.2") + "/", fps=4)  # a trailing / is a folder
    assert folder.is_dir() and len(list(folder.iterdir())) == 2
    (tmp_path / "taken.mp4").mkdir()
    line = _one_error_line(runner.invoke(app, ["render", *SMALL, "--out", str(tmp_path / "taken.mp4")]))
    assert "is an existing folder" in line


@pytest.mark.parametrize("command", ["render", "sweep"])
@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda", "--device 'cuda': CUDA is not available"),
        ("cuda:1", "--device 'cuda:1': CUDA is not available"),
        ("mps", "--device 'mps': mps is not available on this machine"),
        ("meta", "--device 'meta': meta is not available on this machine"),
        ("gpu", "--device 'gpu': not a torch device name"),
    ],
)
def test_unavailable_device_is_a_clear_error(tmp_path, monkeypatch, command, device, message):
    # issue 15: `--device cuda` without CUDA ended in "AssertionError: Torch not compiled with CUDA enabled"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    out = tmp_path / ("v.mp4" if command == "render" else "sweep")
    args = ["--model", "tiny-wan", "--steps", "1", "--device", device, "--no-progress", "--out", str(out)]
    line = _one_error_line(runner.invoke(app, [command, *args]))
    assert message in line and line.endswith("available here: cpu")
    assert not out.exists()


def test_sweep_out_under_a_file_is_a_clear_error(tmp_path):
    # issue 15: a sweep --out below a regular file ended in a NotADirectoryError traceback
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    args = ["sweep", "--model", "tiny-wan", "--methods", "blocktopk", "--steps", "1", "--no-progress", "--out"]
    line = _one_error_line(runner.invoke(app, [*args, str(blocker / "runs")]))
    assert line == f"error: --out: cannot write under {blocker / 'runs'} (Not a directory: {blocker} is a file)"
    line = _one_error_line(runner.invoke(app, [*args, str(blocker)]))
    assert "is a file; a sweep writes a folder" in line
    assert blocker.read_text() == "keep me"


def test_render_under_a_file_says_not_a_directory(tmp_path):
    # issue 15: `--out file/v.mp4` printed "(File exists)" (mkdir's errno) where "Not a directory" is meant
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    for out in (blocker / "v.mp4", blocker / "sub" / "v.mp4", blocker / "frames"):
        line = _one_error_line(runner.invoke(app, ["render", *SMALL, "--no-progress", "--out", str(out)]))
        assert "Not a directory" in line and f"{blocker} is a file" in line and "File exists" not in line
    assert blocker.read_text() == "keep me"


@needs_toy
@pytest.mark.parametrize(
    "args, shown",
    [
        (["--height", "33"], "--height 33 --width 64 (the model's default)"),
        (["--width", "30"], "--height 64 (the model's default) --width 30"),
    ],
)
def test_size_check_applies_when_only_height_or_width_is_given(tmp_path, args, shown):
    # issue 15: with one of the two given, the early check was skipped and the pipeline failed later, its own way
    out = tmp_path / "v.mp4"
    result = runner.invoke(app, ["render", "--model", str(TOY), *args, "--no-progress", "--out", str(out)])
    assert _one_error_line(result).startswith(f"error: {shown}: ToyVideoPipeline needs multiples of 4")


@needs_toy
def test_prompt_words_outside_the_toy_vocabulary_are_named_once(tmp_path):
    # issue 15: unknown words were silently read as <unk>
    from dit_accel.toy import VOCAB

    out = tmp_path / "v.png"
    prompt = ["--prompt", "a purple cat moves left, a purple cat", "--negative-prompt", "blurry"]
    result = runner.invoke(app, ["render", *TOY_TINY, *prompt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.output
    assert "'purple', 'cat', 'blurry'" in warnings[0] and "moves" not in warnings[0].split("(vocabulary")[0]
    assert warnings[0].endswith(f"(vocabulary: {' '.join(VOCAB[2:])})")
    assert out.exists()
    quiet = runner.invoke(app, ["render", *TOY_TINY, "--prompt", "a red circle moves left", "--out", str(out)])
    assert quiet.exit_code == 0 and "warning:" not in quiet.output


def _documented_toy_prompts() -> list[tuple[str, str]]:
    """(file, prompt) of every toy-model prompt in README.md, docs/*.md and the toy model's README: ``--prompt``
    of a dit-accel command that names no other model, and the toy pipeline's Python examples. A command shown
    with the vocabulary warning it gives (the next line starts with ``warning:``) is an example of that warning."""
    found = []
    for path in [ROOT / "README.md", TOY / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text().replace("\\\n", " ")
        lines = text.splitlines()
        for line, after in zip(lines, [*lines[1:], ""]):
            if after.startswith("warning:"):
                continue
            if "--prompt" in line and ("dit-accel" in line or "sweep.py" in line):
                argv = shlex.split(line, comments=True)
                model = argv[argv.index("--model") + 1] if "--model" in argv else default_model()
                if Path(model).name != "toy-wan":
                    continue
                found += [(path.name, argv[i + 1]) for i, a in enumerate(argv) if a == "--prompt" and i + 1 < len(argv)]
        found += [(path.name, m) for m in re.findall(r'(?:prompts=\[|pipe\()"([^"]+)"', text)]
    return found


def test_documented_toy_prompts_use_the_vocabulary():
    # issue 15: docs/cli.md, sweep.md and python.md prompted "a red circle moves right over a black background"
    from dit_accel.toy import VOCAB

    prompts = _documented_toy_prompts()
    assert len(prompts) >= 5, prompts  # the examples are found at all
    bad = [(name, p, w) for name, p in prompts for w in re.findall(r"[a-z]+", p.lower()) if w not in VOCAB]
    assert not bad, bad


def test_info_does_not_import_the_heavy_modules():
    # issue 15: `dit-accel info` took seconds importing diffusers (and torch._dynamo through it) to print a list
    code = (
        "import json, sys\n"
        "from dit_accel.cli import app\n"
        "try:\n    app(['info'])\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "heavy = ['diffusers', 'transformers', 'torch._dynamo', 'triton', 'dit_accel.api', 'dit_accel.runtime',"
        " 'dit_accel.toy', 'imageio']\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DIT_ACCEL_KERNELS"}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")  # on CPU: no Triton kernels to look for
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "methods:" in proc.stdout and json.loads(lines[-1]) == []
