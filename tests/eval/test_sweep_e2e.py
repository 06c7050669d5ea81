"""The sweep end to end on a tiny pipeline (through the CLI): three files with the promised fields, then resume."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dit_accel.cli import app

ARGS = [
    "sweep",
    "--model",
    "tiny-wan",
    "--methods",
    "blocktopk",
    "--sparsity",
    "0.5",
    "--steps",
    "2",
    "--seeds",
    "0",
    "--frames",
    "5",
    "--height",
    "128",
    "--width",
    "128",
    "--option",
    "min_tokens=0",
    "--no-warmup",
    "--no-progress",
]


def test_sweep_writes_results_report_plot_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    runner = CliRunner()
    first = runner.invoke(app, [*ARGS, "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "1 new records, 0 already done" in first.output

    results = json.loads((out / "results.json").read_text())
    assert results["spec"]["methods"] == ["blocktopk"]
    (record,) = results["records"]
    for field in (
        "config",
        "seed",
        "wall_s",
        "attention_s",
        "density",
        "speedup",
        "est_speedup",
        "est_speedup_flops",
        "psnr",
        "ssim",
        "lpips",
        "flicker_delta",
        "latent_rel_error",
        "attn_rel_error",
    ):
        assert field in record, field
    assert record["config"]["sparsity"] == 0.5 and record["seed"] == 0
    assert record["density"] == 0.5 and record["sparse_calls"] > 0
    assert 0 < record["attn_rel_error"] < 1 and record["latent_rel_error"] > 0
    assert 0 < record["attention_flop_share"] < 1 and record["est_speedup_flops"] > 1
    assert record["wall_s"] > 0 and record["attention_s"] > 0 and 10 < record["psnr"] <= 100
    report = (out / "report.md").read_text()
    assert "Best configuration per quality level" in report and "blocktopk (min_tokens=0, sparsity=0.5)" in report
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    second = runner.invoke(app, [*ARGS, "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert "0 new records, 1 already done" in second.output
    again = json.loads((out / "results.json").read_text())
    assert again["records"] == results["records"]  # finished records kept untouched


def test_sweep_keeps_a_contact_sheet_and_announces_a_long_sweep(tmp_path, monkeypatch):
    """Frame strips of dense and every configuration, a contact sheet beside the report, the prompt and the real
    size in its header, and an estimate printed before a sweep longer than the threshold."""
    from dit_accel.eval import sweep

    monkeypatch.setattr(sweep, "ESTIMATE_ABOVE_S", 0.0)  # every sweep counts as long here
    out = tmp_path / "sweep"
    args = [a if a != "blocktopk" else "blocktopk,window" for a in ARGS]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sweep: 3 renders of 2 steps, about" in result.output  # dense + two configurations
    strips = sorted(p.name.split("-")[0] for p in (out / "frames").glob("*.png"))
    assert strips == ["blocktopk", "dense", "window"]
    report = (out / "report.md").read_text()
    assert "![contact sheet](contact.png)" in report and (out / "contact.png").read_bytes()[:4] == b"\x89PNG"
    assert "rendered at 5 frames x 128 x 128 px, 2 steps" in report and "Prompts: the model's own input." in report
    assert "measured (cpu; cpu kernels)" in report
