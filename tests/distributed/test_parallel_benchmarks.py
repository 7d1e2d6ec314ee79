"""The parallel benchmarks run on CPU and agree with themselves (smoke tests, small shapes)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*argv, timeout=600):
    res = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**__import__("os").environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def test_step_benchmark_prints_table(tmp_path):
    out = run("benchmarks/step.py", "--preset", "tiny", "--nproc", "2", "--layout", "sp2", "--ac", "full",
              "--steps", "1", "--warmup", "1", "--json", str(tmp_path / "step.json"))
    assert "| tiny | sp2 | 2 | full |" in out, out
    (row,) = json.loads((tmp_path / "step.json").read_text())
    assert row["step_s"] > 0 and row["flops_per_device"] > 0 and row["tokens"] == 4 * 8 * 8


def test_comm_benchmark_analytic_equals_counted(tmp_path):
    run("benchmarks/parallel_comm.py", "--preset", "tiny", "--sp", "2", "--tp", "2", "--json",
        str(tmp_path / "comm.json"))
    rows = json.loads((tmp_path / "comm.json").read_text())
    assert {(r["kind"], r["size"]) for r in rows} == {("sp", 2), ("tp", 2)}
    for r in rows:
        assert r["measured_total"] > 0
        assert r["analytic"].keys() == r["measured"].keys(), r
        for k in r["analytic"]:
            assert abs(r["analytic"][k] - r["measured"][k]) <= 1e-6 * r["analytic"][k], (r["kind"], k, r)


def test_max_seq_smoke_bisects():
    out = run("benchmarks/max_seq.py", "--smoke")
    assert "| tiny | 8x8 | 5 | 80 | full | True |" in out, out
