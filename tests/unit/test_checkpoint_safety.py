"""Checkpoint verification, fall-back to the previous checkpoint, and no code execution from any
checkpoint file (issue #14). Single process; the 2-rank paths are in tests/distributed."""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch

from vchitect.config import ConfigError
from vchitect.train import safe_dcp
from vchitect.train.checkpoint import (Checkpointer, CheckpointError, find_verified, rng_state, set_rng_state,
                                       step_dir, verify)

pytestmark = pytest.mark.filterwarnings("ignore:.*single process")


class Payload:
    """Unpickling this writes ``marker``: what a crafted file would do with plain pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _save(root: Path, step: int, extra: dict | None = None, checksums: bool = True) -> Path:
    torch.manual_seed(step)
    state = {"model": {"w": torch.randn(64, 8), "b": torch.randn(8)}, "step": step,
             "dataloader_dp0": json.dumps({"consumed": step}), "rng_rank0": rng_state(), **(extra or {})}
    Checkpointer(root, keep=5, async_save=False, checksums=checksums).save(
        step, state, {"step": step, "world_size": 1, "config": {"model": {}}})
    return step_dir(root, step)


@pytest.fixture
def two(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    _save(root, 2)
    return root


def _shard(path: Path) -> Path:
    return next(path.glob("*.distcp"))


DAMAGE = {
    "truncated shard": lambda p: _shard(p).write_bytes(_shard(p).read_bytes()[:100]),
    "deleted shard": lambda p: _shard(p).unlink(),
    "truncated metadata": lambda p: (p / ".metadata").write_bytes((p / ".metadata").read_bytes()[:50]),
    "empty vchitect.json": lambda p: (p / "vchitect.json").write_text(""),
    "flipped byte": lambda p: _flip(_shard(p)),
    "no vchitect.json": lambda p: (p / "vchitect.json").unlink(),
    "no .metadata": lambda p: (p / ".metadata").unlink(),
}
NAMED = {"truncated shard": ".distcp", "deleted shard": ".distcp", "truncated metadata": ".metadata",
         "empty vchitect.json": "vchitect.json", "flipped byte": ".distcp", "no vchitect.json": "vchitect.json",
         "no .metadata": ".metadata"}


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def test_save_records_a_manifest_of_every_file(two):
    meta = json.loads((two / "step-000000002" / "vchitect.json").read_text())
    files = meta["manifest"]["files"]
    on_disk = {p.name for p in (two / "step-000000002").iterdir()} - {"vchitect.json"}
    assert set(files) == on_disk and ".metadata" in files
    for name, entry in files.items():
        assert entry["size"] == (two / "step-000000002" / name).stat().st_size
        assert len(entry["sha256"]) == 64
    assert verify(two / "step-000000002") is None


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_auto_resume_passes_over_a_damaged_newest_checkpoint(two, kind, caplog):
    DAMAGE[kind](two / "step-000000002")
    reason = verify(two / "step-000000002")
    assert reason and NAMED[kind] in reason, reason
    ck = Checkpointer(two, keep=5, async_save=False)
    with caplog.at_level(logging.WARNING, logger="vchitect.train"):
        assert ck.resolve_resume("auto") == two / "step-000000001"
    passed = [r.getMessage() for r in caplog.records if "passing over" in r.getMessage()]
    assert passed == [f"passing over checkpoint step-000000002: {reason}"]
    with pytest.raises(ConfigError, match="cannot be resumed from") as err:
        ck.resolve_resume(str(two / "step-000000002"))
    assert NAMED[kind] in str(err.value) and "\n" not in str(err.value)


def test_unfinished_saves_are_named_when_passed_over(two):
    shutil.copytree(two / "step-000000002", two / "step-000000003.tmp")
    lines: list[str] = []
    assert find_verified(two, say=lines.append) == two / "step-000000002"
    assert lines == [f"passing over checkpoint step-000000003.tmp: {two / 'step-000000003.tmp'} is an unfinished "
                     f"save (.tmp): the run stopped while writing it"]


def test_sizes_only_catches_truncation_not_a_flipped_byte(two):
    _flip(_shard(two / "step-000000002"))
    assert verify(two / "step-000000002", checksum=False) is None
    assert "SHA-256" in verify(two / "step-000000002")
    _shard(two / "step-000000002").write_bytes(b"x")
    assert "bytes" in verify(two / "step-000000002", checksum=False)


def test_checkpoints_without_a_manifest_are_still_checked_against_their_metadata(two):
    path = two / "step-000000002"
    meta = json.loads((path / "vchitect.json").read_text())
    del meta["manifest"]  # as written by vchitect before manifests
    (path / "vchitect.json").write_text(json.dumps(meta))
    assert verify(path) is None
    _shard(path).write_bytes(_shard(path).read_bytes()[:10])
    assert "truncated" in verify(path)


# ------------------------------------------------------------------ RNG state: JSON, no pickle
def test_rng_state_round_trips_exactly():
    torch.manual_seed(3)
    random.seed(3)
    saved = rng_state()
    json.loads(saved)  # plain JSON
    a = (torch.rand(5), random.random())
    set_rng_state(saved)
    b = (torch.rand(5), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_crafted_rng_state_is_refused_without_running(tmp_path):
    import base64
    import io

    marker = tmp_path / "rng_marker"
    buf = io.BytesIO()
    torch.save({"torch": Payload(marker)}, buf)  # the format rng_state() had before: torch.save + base64
    crafted = base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(CheckpointError, match="RNG state"):
        set_rng_state(crafted)
    with pytest.raises(CheckpointError, match="RNG state"):
        set_rng_state(json.dumps({"torch": crafted, "python": [3, [1, 2], None]}))
    assert not marker.exists()
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # the payload is live with plain loading
    assert marker.read_text() == "pwned"


# ------------------------------------------------------------------ DCP metadata and byte entries
def _craft_metadata(path: Path, marker: Path) -> None:
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    meta = json.loads((path / "vchitect.json").read_text())
    meta.pop("manifest")  # an attacker rewrites the manifest too; without one only structure is checked
    (path / "vchitect.json").write_text(json.dumps(meta))


def test_crafted_metadata_is_refused_on_every_read_path(two, tmp_path):
    from vchitect.export import ExportError, export
    from vchitect.export.export import pipeline_from_checkpoint
    from vchitect.train.checkpoint import load_tensors

    marker = tmp_path / "metadata_marker"
    bad = two / "step-000000002"
    _craft_metadata(bad, marker)
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match="builtins.exec"):
        safe_dcp.read_metadata(bad)
    assert "refused" in verify(bad)
    lines: list[str] = []
    assert find_verified(two, say=lines.append) == two / "step-000000001"  # resume falls back
    assert "builtins.exec" in lines[0]
    with pytest.raises(ConfigError, match="builtins.exec"):  # explicit resume
        Checkpointer(two, keep=5, async_save=False).resolve_resume(str(bad))
    with pytest.raises(safe_dcp.UnsafeCheckpointError):
        load_tensors(bad)
    with pytest.raises(ExportError, match="builtins.exec"):  # vchitect export
        export(bad, tmp_path / "out")
    with pytest.raises(ExportError, match="builtins.exec"):  # vchitect sample (checkpoint source)
        pipeline_from_checkpoint(bad)
    assert not marker.exists()
    pickle.loads((bad / ".metadata").read_bytes())  # the payload is live with plain pickle
    assert marker.exists()


def test_crafted_byte_entry_is_refused_without_running(tmp_path):
    marker = tmp_path / "entry_marker"
    path = _save(tmp_path / "checkpoints", 1, extra={"lr_scheduler": {"last_epoch": Payload(marker)}})
    assert verify(path) is None  # structurally a checkpoint: the refusal comes when the entry is read
    state = {"lr_scheduler": {"last_epoch": 0}, "step": 0}
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match="lr_scheduler.last_epoch"):
        Checkpointer(tmp_path / "checkpoints", keep=5, async_save=False).load(path, state)
    assert not marker.exists()


def test_opaque_entries_load_whole_whatever_the_template_holds(two):
    state = {"dataloader_dp0": "", "rng_rank0": "", "step": -1}
    Checkpointer(two, keep=5, async_save=False).load(two / "step-000000002", state)
    assert json.loads(state["dataloader_dp0"]) == {"consumed": 2} and state["step"] == 2
    json.loads(state["rng_rank0"])
