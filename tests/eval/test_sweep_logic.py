"""Sweep grid, sharding and merging of per-process parts, probe and report, without launching processes."""

from __future__ import annotations

import json

import pytest

import dit_accel
from dit_accel.eval import report, sweep


def test_grid_follows_methods_dynamically():
    spec = sweep.SweepSpec(methods=None, sparsity=[0.5, 0.9], schedule={"dense_steps": [0, 1]})
    grid = sweep.build_grid(spec)
    methods = {cfg["method"] for cfg in grid}
    assert methods == set(dit_accel.METHODS)
    for cfg in grid:
        if cfg["method"] == "dense" or cfg["method"].endswith("-paper"):
            assert "sparsity" not in cfg  # single reference point at the published/preset settings
        else:
            assert cfg["sparsity"] in (0.5, 0.9) and cfg["dense_steps"] in (0, 1)
    ours = [c for c in grid if c["method"] == "blocktopk"]
    assert len(ours) == 4


def test_grid_rejects_bad_input_before_running():
    with pytest.raises(ValueError, match="unknown"):
        sweep.build_grid(sweep.SweepSpec(methods=["nope"]))
    with pytest.raises(ValueError, match="sparsity"):
        sweep.build_grid(sweep.SweepSpec(methods=["blocktopk"], sparsity=[1.5]))


def _record(method, sparsity, seed, speed, psnr, paper=False):
    return {
        "key": json.dumps({"method": method, "sparsity": sparsity}, sort_keys=True),
        "method": method,
        "options": {"sparsity": sparsity},
        "paper": paper,
        "seed": seed,
        "prompt": None,
        "speedup": speed,
        "est_speedup": speed,
        "density": 1 - sparsity,
        "attention_work": 1 - sparsity + 0.1 * seed,  # differs by seed: the table shows the mean
        "psnr": psnr,
        "ssim": 0.9,
        "kernel_backend": "reference",
        "sparse_calls": 4,
    }


def test_merge_parts_keeps_existing_and_adds_every_rank(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"spec": None, "records": [_record("a", 0.5, 0, 1.5, 40)]}))
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "rank0.json").write_text(json.dumps({"records": [_record("a", 0.9, 0, 2.0, 30)]}))
    (tmp_path / "parts" / "rank1.json").write_text(json.dumps({"records": [_record("b", 0.9, 0, 2.5, 25)]}))
    (tmp_path / "parts" / "done.rank0").write_text("1")
    assert len(sweep._finished(tmp_path)) == 3  # an interrupted multi-process run's parts count as done
    merged = sweep.merge_parts(tmp_path, {"model": "m"})
    assert len(merged["records"]) == 3 and merged["spec"] == {"model": "m"}
    assert not (tmp_path / "parts").exists()
    assert len(json.loads((tmp_path / "results.json").read_text())["records"]) == 3


def test_report_table_levels_and_pareto(tmp_path):
    records = [
        _record("ours", 0.5, 0, 1.5, 42),
        _record("ours", 0.5, 1, 1.5, 38),  # mean 40 dB over two seeds
        _record("ours", 0.9, 0, 3.0, 28),
        _record("x-paper", 0.8, 0, 2.0, 26, paper=True),  # dominated by ours@0.9
    ]
    front = report.pareto_front(report.aggregate(records), "est_speedup")
    assert [r["method"] for r in front] == ["ours", "ours"]
    files = report.write_report(records, tmp_path, spec={"model": "m", "seeds": [0, 1]})
    text = (tmp_path / "report.md").read_text()
    assert "estimated" in text and "| near-lossless | 40 | ours (sparsity=0.5)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ours") or line.startswith("| x-paper")]
    assert rows[0].startswith("| ours (sparsity=0.9)")  # fastest first
    assert "| density | attention work |" in text and any("| 0.500 | 0.550 |" in r for r in rows)  # mean work
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and files["pareto"].endswith("pareto.png")


def test_report_ranks_configurations_when_none_reaches_a_level(tmp_path):
    records = [_record("a", 0.9, 0, 3.0, 18.0), _record("b", 0.8, 0, 2.0, 21.5), _record("c", 0.5, 0, 1.5, 21.5)]
    report.write_report(records, tmp_path, spec={"model": "m", "seeds": [0]})
    text = (tmp_path / "report.md").read_text()
    assert "No configuration reached 25 dB" in text
    ranked = [line.split(" | ")[1] for line in text.splitlines() if line[:4] in ("| 1 ", "| 2 ", "| 3 ")]
    assert ranked == ["b (sparsity=0.8)", "c (sparsity=0.5)", "a (sparsity=0.9)"]  # PSNR first, then speed
    reached = [_record("a", 0.9, 0, 3.0, 26.0)]
    report.write_report(reached, tmp_path, spec={"model": "m", "seeds": [0]})
    assert "No configuration reached" not in (tmp_path / "report.md").read_text()


def test_plot_marks_dense_and_claims_identity_only_when_true(tmp_path):
    rows = report.aggregate([_record("dense", 0.0, 0, 1.0, 100.0), _record("a", 0.9, 0, 3.0, 28.0)])
    labels = report._plot(rows, "est_speedup", tmp_path / "p.png")
    assert "dense (the reference, 1.0x)" in labels and "output identical to dense" not in labels
    assert "ours" in labels  # the dense row is the reference mark, not one of ours
    rows = report.aggregate([_record("a", 0.9, 0, 3.0, 28.0), _record("b", 0.2, 0, 1.1, 100.0)])
    assert "output identical to dense" in report._plot(rows, "est_speedup", tmp_path / "p.png")


def test_speed_basis_counts_auto_picks_of_gpu_kernels_as_measured():
    # bug: only the literal "triton" counted, so a GPU sweep where auto chose FlexAttention for one bucket
    # (reported as "auto(flex,triton)") fell back to estimates
    from dit_accel.eval.report import speed_basis

    def rows(backend):
        return [{"kernel_backend": backend, "speedup": 1.5, "est_speedup_flops": 2.0}]

    assert speed_basis(rows("auto(flex,triton)")) == "speedup"
    assert speed_basis(rows("triton")) == "speedup"
    assert speed_basis(rows("auto(cpu,reference)")) == "est_speedup_flops"
    assert speed_basis(rows("cpu")) == "est_speedup_flops"
