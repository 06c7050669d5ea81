"""Work split across processes (dit_accel.batch): one share rule for batch renders and sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from dit_accel.batch import merge_records, rank_world, read_prompts, shard


def test_shard_is_a_contiguous_balanced_partition_with_indices() -> None:
    items = [f"p{i}" for i in range(11)]
    shards = [shard(items, r, 3) for r in range(3)]
    assert [i for s in shards for i, _ in s] == list(range(11))  # every item once, in order
    assert [len(s) for s in shards] == [3, 4, 4]
    assert all(items[i] == item for s in shards for i, item in s)
    assert shard(items[:2], 2, 3) == [(1, "p1")] and shard([], 0, 2) == []
    with pytest.raises(ValueError, match="rank=3"):
        shard(items, 3, 3)
    with pytest.raises(ValueError, match="world=0"):
        shard(items, 0, 0)


def test_merge_restores_order_and_reports_gaps() -> None:
    records = [{"index": 2}, {"index": 0}, {"index": 1}]
    assert [r["index"] for r in merge_records(records, 3)] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"no record for item\(s\) \[1\]"):
        merge_records([{"index": 0}, {"index": 2}], 3)
    with pytest.raises(ValueError, match="twice"):
        merge_records([{"index": 0}, {"index": 0}], 1)


def test_read_prompts_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# header\na cat\n\n  a dog  \n")
    assert read_prompts(path) == ["a cat", "a dog"]
    path.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(path)
    with pytest.raises(FileNotFoundError, match="--batch-file"):
        read_prompts(tmp_path / "missing.txt")


def test_rank_world_from_the_launchers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_world() == (1, 2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 and WORLD_SIZE=2"):
        rank_world()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank_world() == (0, 1)
