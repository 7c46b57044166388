"""Metrics sink: JSON lines always; wandb never blocks training."""

import json
import math
import time
from pathlib import Path

import pytest
import torch

from sae_stream.config import WandbConfig
from sae_stream.tracking import Tracker


def test_tracker__jsonl_records_are_plain_json(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, WandbConfig(enabled=False))
    tracker.log(10, {"loss": torch.tensor(0.5), "nan": math.nan, "hist": {"counts": torch.tensor([1, 2])}})
    tracker.log(20, {"loss": 0.25})
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0]["loss"] == 0.5 and rows[0]["nan"] is None and rows[0]["hist"]["counts"] == [1, 2]


def test_tracker__hanging_wandb_init_falls_back_to_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    modes = []

    class FakeRun:
        def __init__(self) -> None:
            self.logged = []

        def log(self, payload: dict, step: int) -> None:
            self.logged.append((step, payload))

        def finish(self) -> None:
            pass

    def fake_init(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            time.sleep(5)  # what wandb does with a key set and no network (for ~100 s)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="offline mode"):
        tracker = Tracker(tmp_path, WandbConfig(enabled=True, init_timeout_s=0.3), {"a": 1})
    assert time.perf_counter() - start < 2.0
    assert modes == ["online", "offline"]
    tracker.log(1, {"loss": 1.0, "skipped_text": "x"})
    assert tracker._wandb.logged == [(1, {"loss": 1.0})]
    tracker.close()


def test_tracker__wandb_disabled_by_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(tmp_path, WandbConfig(enabled=True, init_timeout_s=0.1))
    assert tracker._wandb is None
    tracker.close()


def test_tracker__drop_after_keeps_earlier_records_and_drops_a_torn_line(tmp_path) -> None:
    tracker = Tracker(tmp_path)
    for step in (10, 20, 30):
        tracker.log(step, {"mse": step / 10})
    tracker.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "ms')  # killed while writing
    tracker = Tracker(tmp_path)
    tracker.drop_after(20)
    tracker.log(30, {"mse": 9.0})
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["mse"]) for r in rows] == [(10, 1.0), (20, 2.0), (30, 9.0)]
