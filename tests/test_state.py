"""Per-round checkpoints: written atomically with checksums, rotated, checked end to end on
load (a truncated or bit-flipped one falls back to the previous one with a warning), refused
when they belong to another run, and enough to resume a run exactly."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peerd.algorithm.submodel import init_params
from peerd.config import SimConfig, TrainConfig
from peerd.data import load_task_data
from peerd.models.base import fingerprint
from peerd.sim import build, run_round
from peerd.state import (
    CHECKPOINT_DIR,
    CheckpointMismatch,
    checkpoint_rounds,
    load_checkpoint,
    read_checkpoint,
    rewind,
    save_checkpoint,
)
from peerd.tasks import BLOCK_SIZE, get_task

IDENTITY = {"peer_id": "peer-00", "task": "digits", "method": "msfusion", "seed": 0,
            "model_fingerprint": "fp"}


def params_after(round_index: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(round_index)
    return {"conv.weight": torch.randn(4, 3, generator=generator),
            "head.bias": torch.randn(5, generator=generator)}


SHAPES = {name: tuple(t.shape) for name, t in params_after(0).items()}


def write_rounds(state_dir: Path, rounds: range, keep: int = 3) -> None:
    for round_index in rounds:
        save_checkpoint(state_dir, round_index, params_after(round_index),
                        {**IDENTITY, "view": [["peer-00", 0.5]]}, keep)


def files(state_dir: Path, round_index: int) -> tuple[Path, Path]:
    stem = state_dir / CHECKPOINT_DIR / f"round-{round_index:06d}"
    return stem.with_suffix(".json"), stem.with_suffix(".safetensors")


def test_round_trip_and_rotation(tmp_path: Path) -> None:
    write_rounds(tmp_path, range(1, 6), keep=3)
    assert checkpoint_rounds(tmp_path) == [3, 4, 5]
    assert sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir()) == [
        f"round-00000{r}.{ext}" for r in (3, 4, 5) for ext in ("json", "safetensors")]
    checkpoint = load_checkpoint(tmp_path, SHAPES, IDENTITY)
    assert checkpoint is not None and checkpoint.round == 5
    for name, tensor in params_after(5).items():
        assert torch.equal(checkpoint.params[name], tensor)
    record = json.loads(files(tmp_path, 5)[0].read_text())
    assert record["round"] == 5 and record["view"] == [["peer-00", 0.5]]
    assert record["params_bytes"] == files(tmp_path, 5)[1].stat().st_size
    assert len(record["checksum"]) == len(record["params_sha256"]) == 64


def test_nothing_to_load(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path, SHAPES, IDENTITY) is None


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_bit(path: Path, offset: int = -10, bit: int = 0x04) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= bit
    path.write_bytes(bytes(data))


def flip_the_seed(record: Path) -> None:
    """A bit flip that leaves valid JSON: the record says seed 1 instead of 0."""
    offset = record.read_bytes().index(b'"seed": 0') + len(b'"seed": ')
    flip_a_bit(record, offset, bit=0x01)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: cut_in_half(files(d, 5)[1]), "truncated"),
        (lambda d: flip_a_bit(files(d, 5)[1]), "SHA-256 differs"),
        (lambda d: flip_the_seed(files(d, 5)[0]), "checksum does not match"),
        (lambda d: cut_in_half(files(d, 5)[0]), "unreadable record"),
        (lambda d: files(d, 5)[1].unlink(), "parameters unreadable"),
    ],
    ids=["params-truncated", "params-bit-flip", "record-bit-flip", "record-truncated",
         "params-missing"],
)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, reason: str
) -> None:
    write_rounds(tmp_path, range(1, 6))
    damage(tmp_path)
    with caplog.at_level(logging.WARNING, logger="peerd.state"):
        checkpoint = load_checkpoint(tmp_path, SHAPES, IDENTITY)
    assert checkpoint is not None and checkpoint.round == 4
    assert torch.equal(checkpoint.params["head.bias"], params_after(4)["head.bias"])
    (warning,) = caplog.records
    assert warning.levelname == "WARNING"
    assert str(files(tmp_path, 5)[0]) in warning.getMessage()
    assert reason in warning.getMessage()


def test_every_checkpoint_damaged_means_none(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    write_rounds(tmp_path, range(1, 3))
    for round_index in (1, 2):
        flip_a_bit(files(tmp_path, round_index)[1])
    with caplog.at_level(logging.WARNING, logger="peerd.state"):
        assert load_checkpoint(tmp_path, SHAPES, IDENTITY) is None
    assert len(caplog.records) == 2


def test_non_finite_or_misshapen_parameters_are_unusable(tmp_path: Path) -> None:
    bad = params_after(1)
    bad["head.bias"][2] = float("nan")
    save_checkpoint(tmp_path, 1, bad, IDENTITY, keep=3)
    with pytest.raises(ValueError, match=r"head\.bias is not finite"):
        read_checkpoint(tmp_path, 1, SHAPES)
    save_checkpoint(tmp_path, 2, {"head.bias": torch.zeros(5)}, IDENTITY, keep=3)
    with pytest.raises(ValueError, match="tensors differ from the model's"):
        read_checkpoint(tmp_path, 2, SHAPES)


@pytest.mark.parametrize("key", ["task", "model_fingerprint", "method", "seed", "peer_id"])
def test_a_checkpoint_of_another_run_is_a_clear_error(tmp_path: Path, key: str) -> None:
    write_rounds(tmp_path, range(1, 3))
    other = {**IDENTITY, key: "something else"}
    with pytest.raises(CheckpointMismatch, match=rf"round-000002\.json belongs to another run: "
                                                 rf"{key} .*--state-dir"):
        load_checkpoint(tmp_path, SHAPES, other)


def test_near_round_prefers_exact_then_older_then_newer(tmp_path: Path) -> None:
    write_rounds(tmp_path, range(4, 8), keep=4)  # 4 5 6 7
    near = {r: load_checkpoint(tmp_path, SHAPES, IDENTITY, near_round=r) for r in (5, 9, 2)}
    assert {r: c.round for r, c in near.items() if c is not None} == {5: 5, 9: 7, 2: 4}
    flip_a_bit(files(tmp_path, 5)[1])
    checkpoint = load_checkpoint(tmp_path, SHAPES, IDENTITY, near_round=5)
    assert checkpoint is not None and checkpoint.round == 4


def test_rewind_drops_later_checkpoints_and_log_records(tmp_path: Path) -> None:
    write_rounds(tmp_path, range(1, 6), keep=5)
    lines = [json.dumps({"round": r, "train_loss": 1.0 / r}) for r in range(1, 6)]
    (tmp_path / "rounds.jsonl").write_text("\n".join(lines) + '\n{"round": 6, "tr')
    rewind(tmp_path, 3)
    assert checkpoint_rounds(tmp_path) == [1, 2, 3]
    assert not files(tmp_path, 4)[1].exists()
    kept = [json.loads(line)["round"] for line in
            (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert kept == [1, 2, 3]


def test_resuming_from_checkpoints_continues_the_run_exactly(tmp_path: Path) -> None:
    """Parameters are the engine's whole state: 2 rounds, checkpoint, fresh engines loaded
    from it, 2 more rounds equal 4 uninterrupted rounds bit for bit."""
    torch.set_num_threads(1)
    config = SimConfig(peers=3, rounds=4, out="unused",
                       train=TrainConfig(lr=0.05, local_epochs=1, max_local_steps=4))
    straight = build(config)
    for round_index in range(4):
        run_round(straight, round_index)
    interrupted = build(config)
    for round_index in range(2):
        run_round(interrupted, round_index)
    for engine in interrupted.engines:
        save_checkpoint(tmp_path / engine.peer_id, 2, engine.params,
                        {**IDENTITY, "peer_id": engine.peer_id}, keep=3)
    resumed = build(config)
    for engine in resumed.engines:
        shapes = {name: tuple(t.shape) for name, t in engine.params.items()}
        checkpoint = load_checkpoint(tmp_path / engine.peer_id, shapes,
                                     {**IDENTITY, "peer_id": engine.peer_id})
        assert checkpoint is not None and checkpoint.round == 2
        for name, tensor in engine.params.items():
            tensor.copy_(checkpoint.params[name])
    for round_index in range(checkpoint.round, 4):
        run_round(resumed, round_index)
    for engine, reference in zip(resumed.engines, straight.engines, strict=True):
        for name, tensor in engine.params.items():
            assert torch.equal(tensor, reference.params[name]), (engine.peer_id, name)


def test_a_daemon_refuses_to_resume_another_runs_checkpoint(tmp_path: Path) -> None:
    data = load_task_data("digits", None, block_size=BLOCK_SIZE)
    spec = get_task("digits").model(data)
    save_checkpoint(tmp_path, 4, init_params(spec, 0),
                    {**IDENTITY, "model_fingerprint": fingerprint(spec), "rounds_done": 4,
                     "train_loss": 1.0, "bytes_sent": 0, "bytes_received": 0,
                     "view": [["peer-00", 0.5]]}, keep=3)
    started = subprocess.run(
        [sys.executable, "-m", "peerd.cli", "start", "--no-mdns", "--host", "127.0.0.1",
         "--port", "0", "--peer-id", "peer-00", "--state-dir", str(tmp_path), "--seed", "1",
         "--threads", "1", "--insecure"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert started.returncode == 2, started.stderr  # a configuration error: systemd won't loop
    assert "round-000004.json belongs to another run: seed 0 (this daemon: 1)" in started.stderr
