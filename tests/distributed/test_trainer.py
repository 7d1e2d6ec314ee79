"""The trainer end to end on CPU with gloo: exact resume, partial checkpoints, SIGTERM, resharding,
frozen parameters, non-finite losses and bad configs. Every run is a real `vchitect launch`."""

import json
import signal
import shutil
import subprocess
import time

import pytest
import torch

from tests.helpers_run import ENV, VCHITECT, assert_same_tensors, losses, vchitect, write_config
from vchitect.train.checkpoint import complete_checkpoints, find_latest, load_tensors


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Run A: 2 processes (dp_shard 2), 12 steps, checkpoints at 6 and 12, never interrupted."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp, train={"output_dir": str(tmp / "run")})
    r = vchitect("train", cfg, nproc=2)
    (tmp / "output.txt").write_text(r.stdout + r.stderr)
    return tmp / "run"


def test_reference_run_prints_a_banner_and_one_line_per_checkpoint(reference):
    out = (reference.parent / "output.txt").read_text()
    assert out.count("vchitect train\n") == 1  # rank 0 only
    for line in ("world size  2 × cpu (gloo)", "layout      dp_replicate=1 dp_shard=2",
                 f"output      {reference.resolve()}", "steps       0 → 12; fresh start"):
        assert line in out, line
    assert "trainable)" in out.split("parameters", 1)[1].splitlines()[0]
    saved = [x.split("checkpoint saved to ", 1)[1] for x in out.splitlines() if "checkpoint saved to " in x]
    assert [x.split(" (")[0] for x in saved] == [str(reference / "checkpoints" / f"step-{s:09d}") for s in (6, 12)]
    assert all(" MB, " in x and x.endswith(" s)") for x in saved), saved


def test_reference_run_writes_metrics_checkpoints_and_ema(reference):
    assert [p.name for p in complete_checkpoints(reference / "checkpoints")] == ["step-000000006", "step-000000012"]
    recs = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))
    for key in ("loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "tflops", "peak_mem_gib", "data_wait"):
        assert key in recs[-1], key
    model = load_tensors(reference / "checkpoints" / "step-000000012")
    ema = load_tensors(reference / "checkpoints" / "step-000000012", "ema")
    assert set(ema) <= set(model) and len(ema) > 0
    assert any(not torch.equal(ema[k], model[k]) for k in ema)  # EMA lags behind the weights


def test_exact_resume_after_sigkill(reference, tmp_path):
    cfg = write_config(tmp_path, train={"output_dir": str(tmp_path / "run"), "simulate_crash": "after_save:6"})
    r = vchitect("train", cfg, nproc=2, check=False)
    assert r.returncode != 0
    assert find_latest(tmp_path / "run" / "checkpoints").name == "step-000000006"
    assert max(losses(tmp_path / "run")) == 6
    cfg = write_config(tmp_path, train={"output_dir": str(tmp_path / "run")})
    r = vchitect("train", cfg, nproc=2)
    resumed = tmp_path / "run" / "checkpoints" / "step-000000006"
    assert f"steps       6 → 12; resumed from {resumed} at step 6" in r.stderr
    assert losses(tmp_path / "run") == losses(reference)  # bitwise: floats compare exactly
    final = tmp_path / "run" / "checkpoints" / "step-000000012"
    assert_same_tensors(load_tensors(final), load_tensors(reference / "checkpoints" / "step-000000012"))
    assert_same_tensors(load_tensors(final, "ema"), load_tensors(reference / "checkpoints" / "step-000000012", "ema"))


def test_half_written_checkpoint_is_ignored(reference, tmp_path):
    cfg = write_config(tmp_path, train={"output_dir": str(tmp_path / "run"), "simulate_crash": "in_save:12"})
    r = vchitect("train", cfg, nproc=2, check=False)
    assert r.returncode != 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step-000000012.tmp").is_dir()  # the crash left the save half done
    (ckpts / "step-000000011").mkdir()  # and a stray folder without metadata
    assert find_latest(ckpts).name == "step-000000006"
    cfg = write_config(tmp_path, train={"output_dir": str(tmp_path / "run")})
    r = vchitect("train", cfg, nproc=2)
    assert "resumed from" in r.stderr and "step-000000006" in r.stderr
    assert losses(tmp_path / "run") == losses(reference)
    assert_same_tensors(load_tensors(ckpts / "step-000000012"),
                        load_tensors(reference / "checkpoints" / "step-000000012"))


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    """A truncated shard in the newest checkpoint: auto-resume says so once and resumes from the one
    before, to the same result; naming the damaged folder explicitly is one clean error (exit 2)."""
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    bad = run / "checkpoints" / "step-000000012"
    shard = sorted(bad.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    damaged = tmp_path / "damaged"
    shutil.copytree(bad, damaged / "step-000000012")
    cfg = write_config(tmp_path, train={"output_dir": str(run)})
    r = vchitect("train", cfg, nproc=2)
    passed = [line for line in r.stderr.splitlines() if "passing over checkpoint" in line]
    assert len(passed) == 1 and "step-000000012" in passed[0] and shard.name in passed[0], r.stderr[-2000:]
    assert "resumed from" in r.stderr and "step-000000006" in r.stderr
    assert losses(run) == {s: v for s, v in losses(reference).items() if s > 6}
    assert_same_tensors(load_tensors(bad), load_tensors(reference / "checkpoints" / "step-000000012"))
    r = vchitect("train", cfg, f"train.resume={damaged / 'step-000000012'}", nproc=2, check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "Traceback" not in out and out.count("config error:") == 1, out[-3000:]
    assert shard.name in out and "cannot be resumed from" in out


def test_sigterm_checkpoints_exits_75_and_resumes_to_the_same_result(reference, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path, train={"output_dir": str(run), "checkpoint_every": 0})
    cmd = [*VCHITECT, "launch", "--nproc", "2", "train", str(cfg)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    stopped = find_latest(run / "checkpoints")
    step = int(stopped.name.split("-")[1])
    assert 2 <= step < 12, "the signal should stop the run early"
    vchitect("train", cfg, nproc=2)
    assert losses(run) == losses(reference)
    assert_same_tensors(load_tensors(run / "checkpoints" / "step-000000012"),
                        load_tensors(reference / "checkpoints" / "step-000000012"))


def test_resume_on_a_different_layout(tmp_path):
    """Save on 4 processes (dp_shard 2 × sp 2), resume on 2 (dp_shard 2)."""
    four = tmp_path / "four"
    cfg4 = write_config(tmp_path, "four.yaml", parallel={"dp_shard": 2, "sp": 2},
                        train={"output_dir": str(four), "steps": 4, "checkpoint_every": 2})
    vchitect("train", cfg4, nproc=4)
    two = tmp_path / "two"
    (two / "checkpoints").mkdir(parents=True)
    shutil.copytree(four / "checkpoints" / "step-000000002", two / "checkpoints" / "step-000000002")
    cfg2 = write_config(tmp_path, "two.yaml", parallel={"dp_shard": 2, "sp": 1},
                        train={"output_dir": str(two), "steps": 3, "checkpoint_every": 2})
    r = vchitect("train", cfg2, nproc=2)
    assert "saved on 4 ranks" in r.stderr
    got, want = losses(two)[3], losses(four)[3]
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)


def test_frozen_parameters_stay_bit_identical(tmp_path):
    from vchitect.config import load_config
    from vchitect.models import VchitectTransformer3DModel

    cfg = write_config(tmp_path, train={"output_dir": str(tmp_path / "run"), "steps": 3, "checkpoint_every": 0,
                                        "trainable": ["*temporal*"], "ema_decay": 0.0})
    vchitect("train", cfg, nproc=2)
    torch.manual_seed(0)  # the trainer's seed: same initial weights
    model = VchitectTransformer3DModel(**vars(load_config(cfg).model))
    init, unused = model.state_dict(), set(model.unused_parameter_names())
    final = load_tensors(tmp_path / "run" / "checkpoints" / "step-000000003")
    trained = [k for k in final if "temporal" in k and k.endswith("weight") and k not in unused]
    assert trained and all(not torch.equal(final[k], init[k]) for k in trained)
    for k, v in final.items():
        if "temporal" not in k:
            assert torch.equal(v, init[k]), k


def test_non_finite_losses_are_skipped_then_abort(tmp_path):
    cfg = write_config(tmp_path, train={"output_dir": str(tmp_path / "run"), "lr": 1e20, "grad_clip": 0.0,
                                        "warmup_steps": 0, "max_nonfinite_steps": 3, "checkpoint_every": 0})
    r = vchitect("train", cfg, nproc=2, check=False)
    assert r.returncode != 0
    assert "3 consecutive steps had a non-finite loss" in r.stderr
    assert "step skipped" in r.stderr


def test_bad_configs_fail_before_any_process_group(tmp_path):
    cfg = write_config(tmp_path, train={"output_dir": str(tmp_path / "run")})
    r = vchitect("train", cfg, "train.stepz=3", nproc=2, check=False)
    assert r.returncode == 2 and "train.stepz" in r.stdout
    r = vchitect("train", cfg, "train.lr=fast", nproc=2, check=False)
    assert r.returncode == 2 and "train.lr='fast': expected a number" in r.stdout
    r = vchitect("train", cfg, "parallel.sp=3", nproc=2, check=False)
    assert r.returncode == 2 and "parallel.sp" in r.stdout
    assert not (tmp_path / "run").exists()  # nothing started


def test_layout_error_is_raised_before_init_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    from vchitect.config import load_config
    from vchitect.train.trainer import Trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(write_config(tmp_path), ["parallel.dp_shard=3"])
    with pytest.raises(ValueError, match="dp_shard"):
        Trainer(cfg)
    assert not dist.is_initialized()


def test_validation_samples_prompts_into_gifs_and_tensorboard(tmp_path):
    from tests.helpers_ckpt import make_encoders

    enc = make_encoders(tmp_path / "enc", d_model=16)
    cfg = write_config(
        tmp_path, model={"in_channels": 3, "joint_attention_dim": 16, "pooled_projection_dim": 16},
        data={"encoders": {"text_encoder_path": str(enc["text_encoder"]), "text_encoder_kind": "t5",
                           "dtype": "float32"}},
        train={"output_dir": str(tmp_path / "run"), "steps": 2, "checkpoint_every": 0, "tensorboard": True,
               "validation": {"every": 2, "prompts": ["a red circle", "a blue square"], "steps": 2,
                              "frames": 2, "height": 8, "width": 8}})
    vchitect("train", cfg, nproc=2)
    out = tmp_path / "run" / "samples" / "step-000000002"
    assert sorted(p.name for p in out.glob("*.gif")) == ["00.gif", "01.gif"]
    assert (out / "prompts.txt").read_text().splitlines() == ["a red circle", "a blue square"]
    from PIL import Image

    with Image.open(out / "00.gif") as gif:
        assert gif.size == (8, 8) and gif.n_frames == 2
    assert list((tmp_path / "run" / "tb").glob("events.*"))
