"""Every user error is one line with exit code 2, never a traceback per rank.

Each case runs the real CLI as ``vchitect train`` and as ``vchitect launch --nproc 2 train``.
Mistakes the preflight sees (missing or empty data folder, a missing resume folder or one that is
no checkpoint, missing init_from weights) stop before any rank starts; the others (a checkpoint
whose SHA-256 does not match, weights that do not fit the model) are found by the ranks, and the launcher still
prints one line and returns 2. The subprocesses of all cases run concurrently (a fixture), so
the module costs about the time of its slowest few runs, not the sum of them.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.distributed.test_launch import shard_data
from tests.helpers_run import run_cli, write_config

# case → (what goes wrong, words the one line must hold besides the key), where {tmp} is the case's folder
CASES = {
    "missing_data": ("data.sources[0].uri=", ["{tmp}/no-such-folder", "no such folder",
                                              "point it at a folder of *.tar shards"]),
    "empty_data": ("data.sources[0].uri=", ["{tmp}/empty", "holds no *.tar shards",
                                            "point it at a folder of *.tar shards"]),
    "missing_resume": ("train.resume=", ["{tmp}/no-checkpoint", "no such folder", "give a step-"]),
    "missing_init_from": ("train.init_from=", ["{tmp}/no-weights", "does not exist",
                                               "give a .safetensors file"]),
    "resume_not_a_checkpoint": ("train.resume=", ["{tmp}/not-a-checkpoint",
                                                  "is not a step-XXXXXXXXX checkpoint folder"]),
    # found by the ranks, after the preflight passed (it checks sizes; the ranks check SHA-256s)
    "resume_corrupted": ("train.resume=", ["{tmp}/checkpoints/step-000000001", "does not match its SHA-256"]),
    "init_from_does_not_fit": ("train.init_from=", ["{tmp}/foreign.safetensors", "no place in this model"]),
}
PREFLIGHT = {"missing_data", "empty_data", "missing_resume", "resume_not_a_checkpoint", "missing_init_from"}
MODES = {"train": [], "launch": ["launch", "--nproc", "2"]}


def case_command(case: str, tmp: Path) -> list[str]:
    """The `train CONFIG …` arguments that make ``case`` happen, with its files under ``tmp``."""
    train = {"output_dir": str(tmp / "run"), "steps": 2}
    data, extra = {}, []
    if case == "missing_data":
        data = shard_data(tmp / "no-such-folder")
    elif case == "empty_data":
        (tmp / "empty").mkdir()
        (tmp / "empty" / "README.txt").write_text("shards were meant to be here")
        data = shard_data(tmp / "empty")
    elif case == "missing_resume":
        extra = ["--resume", str(tmp / "no-checkpoint")]
    elif case == "resume_not_a_checkpoint":
        (tmp / "not-a-checkpoint").mkdir()
        extra = ["--resume", str(tmp / "not-a-checkpoint")]
    elif case == "resume_corrupted":
        extra = ["--resume", str(corrupted_checkpoint(tmp / "checkpoints"))]
    elif case == "missing_init_from":
        train["init_from"] = f"sd3:{tmp / 'no-weights'}"
    elif case == "init_from_does_not_fit":
        save_file({"not_a_vchitect_key.weight": torch.zeros(2)}, str(tmp / "foreign.safetensors"))
        train["init_from"] = f"sd3:{tmp / 'foreign.safetensors'}"
    cfg = write_config(tmp, **({"data": data} if data else {}), train=train)
    return ["train", str(cfg), *extra]


def corrupted_checkpoint(root: Path) -> Path:
    """A checkpoint whose shard has the recorded size but one flipped byte."""
    from vchitect.train.checkpoint import Checkpointer, step_dir

    Checkpointer(root, keep=1, async_save=False).save(1, {"step": 1, "w": torch.zeros(64)},
                                                       {"step": 1, "world_size": 1, "config": {}})
    shard = next(step_dir(root, 1).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return step_dir(root, 1)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(case, mode, in_pty) → (exit code, output, seconds, case folder), all run concurrently."""
    jobs = {(case, mode, False) for case in CASES for mode in MODES} | {("missing_data", "train", True)}

    folders = {job: tmp_path_factory.mktemp(f"{job[0]}-{job[1]}-{'pty' if job[2] else 'pipe'}") for job in jobs}

    def run(job):
        case, mode, in_pty = job
        return job, (*run_cli(MODES[mode] + case_command(case, folders[job]), in_pty), folders[job])

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:  # imports are CPU-bound
        return dict(pool.map(run, sorted(jobs)))


def check_one_line(code: int, out: str, must_hold: list[str], kind: str = "config error") -> str:
    assert code == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if f"{kind}:" in line]
    assert len(lines) == 1, out[-3000:]  # one copy, not one per rank; not wrapped at 80 columns
    for words in must_hold:
        assert words in lines[0], (words, lines[0])
    return lines[0]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_config_error_line_with_exit_code_2(results, case, mode):
    code, out, seconds, tmp = results[(case, mode, False)]
    key, words = CASES[case]
    check_one_line(code, out, [key] + [w.format(tmp=tmp) for w in words])
    if case in PREFLIGHT:  # found before any rank (or process group) started: nothing else printed or written
        assert [line for line in out.splitlines() if line.strip()] == [out.strip()], out[-3000:]
        assert not (tmp / "run").exists()


def test_user_error_under_a_terminal_is_one_line_too(results):
    """The same case as missing_data-train (a pipe), on an 80-column pseudo-terminal."""
    code, out, seconds, tmp = results[("missing_data", "train", True)]
    line = check_one_line(code, out, ["data.sources[0].uri=", f"{tmp}/no-such-folder", "set data.source=synthetic"])
    assert len(line) > 80  # longer than the terminal: rich must not have wrapped it
