"""Every parallel layout against a single-process run of the tiny model on the same global batch.

One group of 2 and one group of 4 gloo processes run all their layouts in sequence (see
``parallel_worker.py``); each layout is then asserted on separately here. Per layout: the loss and
every gradient after one step, and every parameter after three AdamW steps, within 1e-5 relative
error (per-tensor norm) in fp32; parameters without gradient (F = 1 temporal branch, the last
block's unused text projections) must be without gradient in both runs. The same groups also
check that noise, dropout seeds and batch rows are shared inside SP/TP groups and differ across
data-parallel groups, and, per layout, that meta-device init + sharded loading gives local shards
bitwise equal to the full-build path's (random init, a released-format checkpoint, SD3 init).
The ``*_adapter`` layouts run the model with a live condition adapter and a random pixel-space
condition (its tokens must be added to each rank's own tokens under SP). The ``*_repvideo`` layouts run
a 4- (3-) layer model with RepVideo layer aggregation (learned gates set away from zero): the window sums
cross the (checkpointed, offloaded) blocks as explicit values and stay per token under SP.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import CASES, RNG_CASES  # noqa: E402

from vchitect.parallel.spawn import run_local  # noqa: E402

TOL = 1e-5
_RESULTS: dict[int, dict] = {}


def results_for(world: int, tmp_dir: Path) -> dict:
    if world not in _RESULTS:
        out = tmp_dir / f"parallel_layouts_{world}.json"
        worker = str(Path(__file__).parent / "parallel_worker.py")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        run_local([worker, "--out", str(out)], world, timeout=600)
        _RESULTS[world] = {r["name"]: r for r in json.loads(out.read_text())}
    return _RESULTS[world]


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory):
    tmp_dir = tmp_path_factory.mktemp("parallel")
    return lambda world: results_for(world, tmp_dir)


@pytest.mark.parametrize("name", list(CASES))
def test_layout_matches_single_process(name, layout_results):
    world, layout, opts = CASES[name]
    rec = layout_results(world)[name]
    assert rec["ok"], f"{name} {layout} {opts} raised:\n{rec.get('traceback')}"
    assert rec["loss_err"] <= TOL, f"{name}: losses {rec['loss']} vs single process {rec['loss_ref']}"
    assert not rec["none_mismatch"], f"{name}: gradient present in one run only: {rec['none_mismatch']}"
    assert rec["checked_grads"] > 50, f"{name}: only {rec['checked_grads']} gradients compared"
    if opts.get("model", {}).get("condition_channels"):  # a live condition adapter and a condition
        assert rec["adapter_grads"] >= 8, f"{name}: {rec['adapter_grads']} non-zero condition-adapter gradients"
    if opts.get("model", {}).get("repvideo"):  # the gates of the mixing blocks (2 … num_layers − 1) have a gradient
        mixing = opts["model"]["num_layers"] - 2
        assert rec["repvideo_gate_grads"] == mixing, f"{name}: {rec['repvideo_gate_grads']} non-zero RepVideo gate " \
                                                     f"gradients, expected {mixing}"
    assert rec["grad_err"] <= TOL, f"{name}: gradient of {rec['worst_grad']} off by {rec['grad_err']:.2e} (relative)"
    assert rec["grad_norm_err"] <= TOL, f"{name}: total gradient norm off by {rec['grad_norm_err']:.2e}"
    assert rec["param_err"] <= TOL, (f"{name}: after 3 AdamW steps {rec['worst_param']} off by "
                                     f"{rec['param_err']:.2e} (relative)")


@pytest.mark.parametrize("name", list(RNG_CASES))
def test_rng_and_data_follow_data_parallel_groups(name, layout_results):
    world, layout = RNG_CASES[name]
    rec = layout_results(world)[name]
    assert rec["ok"], rec.get("traceback")
    assert rec["rng_ok"], f"{name} {layout}: " + "; ".join(rec["problems"])


@pytest.mark.parametrize("name", list(CASES))
def test_meta_init_matches_full_build(name, layout_results):
    world, layout, opts = CASES[name]
    rec = layout_results(world)[name]
    assert rec["ok"], f"{name} {layout} {opts} raised:\n{rec.get('traceback')}"
    meta = rec["meta"]
    for source, loaded in (("random", 0), ("vchitect2", meta["random"]["checked"]), ("sd3", None)):
        r = meta[source]
        assert not r["mismatch"], f"{name} {source}: local shards differ from the full build: {r['mismatch'][:5]}"
        assert r["checked"] > 90 and r["checked"] == meta["random"]["checked"], f"{name} {source}: {r}"
        if loaded is not None:
            assert r["loaded"] == loaded, f"{name} {source}: {r['loaded']} tensors read from the checkpoint"
    # SD3 leaves the video-only parameters and the position table to the constructor
    assert 0 < meta["sd3"]["loaded"] < meta["vchitect2"]["loaded"]
    if layout.get("tp", 1) > 1 or layout.get("dp_shard", 1) * layout.get("sp", 1) > 1:
        r = meta["random"]
        assert r["sharded"] > 50 and r["local_elements"] < r["elements"], f"{name}: nothing was sharded: {r}"
