"""`vchitect` subcommands of the foundation: config show, model-info, demo smoke run, --version, the
`sample` of a path holding nothing; `vchitect-curate config show|describe` and --version."""

import subprocess
import sys
from importlib import metadata

import yaml


def run(*args, module="vchitect.cli"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


def curate(*args):
    return run(*args, module="data_pipeline.cli")


def test_config_show_prints_resolved_yaml():
    r = run("config", "show", "configs/model/tiny.yaml", "model.num_layers=5")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["model"]["num_layers"] == 5


def test_config_error_exit_code_and_message():
    r = run("config", "show", "configs/model/tiny.yaml", "model.num_layerz=5")
    assert r.returncode == 2
    assert "model.num_layerz" in r.stdout and "num_layers" in r.stdout


def test_model_info_2b_prints_official_parameter_count():
    r = run("model-info", "configs/model/vchitect-2b.yaml", "--frames", "40", "--height", "432", "--width", "768")
    assert r.returncode == 0, r.stderr
    assert "2,424,947,776" in r.stdout
    assert "parameters: 2424947776" in r.stdout
    flops = float(r.stdout.split("train_step_flops:")[1].split()[0])
    assert 1e14 < flops < 1e16


def test_demo_smoke_runs_forward_and_backward():
    r = run("demo", "--smoke")
    assert r.returncode == 0, r.stderr
    assert "loss " in r.stdout and "received gradients" in r.stdout


def test_version_comes_from_the_package_metadata():
    version = metadata.version("vchitect")
    assert run("--version").stdout == f"vchitect {version}\n"
    assert curate("--version").stdout == f"vchitect-curate {version}\n"


def test_sample_of_a_path_holding_nothing_names_both_kinds_of_source(tmp_path, capsys):
    from vchitect.cli import main

    (tmp_path / "empty").mkdir()
    for source, why in ((tmp_path / "nope", "it does not exist"),
                        (tmp_path / "empty", "the folder has no model_index.json and no step-… folder")):
        assert main(["sample", str(source), "--prompt", "a cat", "--out", str(tmp_path / "v.gif")]) == 2
        out = capsys.readouterr().out
        assert out.startswith(f"sample error: neither an export folder nor a checkpoint was found at {source} ({why})")
        assert "model_index.json" in out and "step-…" in out and out.count("\n") == 1, out
    assert not list(tmp_path.glob("v.*"))


def test_curate_config_show_resolves_redacts_and_notes_empty_paths():
    r = curate("config", "show", "configs/curate/synthetic.yaml", "clip.max_duration=5",
               "s3.secret=hunter2", "output.path=/data/shards")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["clip"]["max_duration"] == 5.0 and cfg["output"]["samples_per_shard"] == 4  # override, include
    assert cfg["s3"]["secret"] == "<redacted>" and "hunter2" not in r.stdout
    assert "input.path is empty" in r.stderr and "output.path is empty" not in r.stderr
    r = curate("config", "show", "configs/curate/default.yaml", "clip.crf=99")
    assert r.returncode == 2 and "clip.crf=99 is out of range" in r.stderr


def test_curate_config_describe_and_help_text():
    from data_pipeline.config import CurateConfig
    from vchitect.config_base import describe

    r = curate("config", "describe")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("| key | type | default | meaning |\n")
    assert all(f"| `{key}` |" in r.stdout for key, *_ in describe(CurateConfig))
    help_text = curate("--help").stdout
    assert "config" in help_text and "``" not in help_text  # no raw reST markup
