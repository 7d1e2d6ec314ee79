"""A non-editable install works end to end: a wheel of this checkout in a fresh environment
(``env_with_vchitect_wheel``, tests/envs.py), run with the cwd outside the repository. The wheel carries
the sbatch templates, the configs, the start-up hook and SPDX license metadata, with wandb an extra;
``vchitect submit --dry-run`` finds its templates and an export loads without ``trust_remote_code``.
``vchitect demo --quick`` from the same environment: tests/e2e/test_demo_quick.py."""

from __future__ import annotations

import json
import textwrap
import zipfile
from pathlib import Path

from tests.helpers_ckpt import build_model, run_config, write_checkpoint
from vchitect.export import export

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_templates_configs_hook_and_license(env_with_vchitect_wheel):
    with zipfile.ZipFile(env_with_vchitect_wheel.wheel) as whl:
        names = set(whl.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(f"{info}/METADATA").decode()
        record = whl.read(f"{info}/RECORD").decode()
    data = {f"vchitect/_resources/{p.relative_to(REPO).as_posix()}"
            for pattern in ("configs/**/*.yaml", "slurm/*.sbatch") for p in REPO.glob(pattern)}
    assert {"vchitect/_resources/slurm/train.sbatch", "vchitect/_resources/slurm/curate.sbatch",
            "vchitect/_resources/configs/train/demo.yaml"} <= data
    shipped = data | {"vchitect_diffusers_hook.pth", "_vchitect_diffusers_hook.py", "vchitect/export/remote_code.py"}
    assert shipped <= names, sorted(shipped - names)
    assert all(f"{n}," in record for n in shipped)  # `pip uninstall` removes them
    assert "License-Expression: Apache-2.0" in metadata and "\nLicense: " not in metadata
    warnings = [line for line in env_with_vchitect_wheel.info["build_log"].splitlines() if "Warning" in line]
    assert not [w for w in warnings if "license" in w.lower() or "deprecat" in w.lower()], warnings
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    wandb = [r for r in requires if r.startswith("Requires-Dist: wandb")]
    assert wandb == ['Requires-Dist: wandb>=0.17; extra == "wandb"'], wandb
    assert 'Requires-Dist: deepspeed>=0.15; extra == "deepspeed"' in requires


def test_the_installed_wheel_finds_its_templates(env_with_vchitect_wheel, tmp_path):
    """(curate.sbatch is found by the same look-up; the test above checks that the wheel carries it)"""
    env = env_with_vchitect_wheel
    train = env.run(["vchitect", "submit", "train", str(REPO / "configs/train/demo.yaml"), "train.steps=10",
                     "--nodes", "2", "--gpus-per-node", "8", "--dry-run"], cwd=tmp_path, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "#SBATCH --nodes=2" in train.stdout and "torchrun" in train.stdout
    assert f"VENV_BIN={env.root / 'bin'}" in train.stdout  # the job runs the wheel's environment


def test_the_installed_wheel_loads_an_export_without_trust_remote_code(env_with_vchitect_wheel, tmp_path):
    """The wheel's start-up hook answers the folder's entry files with the wheel's classes; no folder code runs."""
    write_checkpoint(tmp_path / "run", 1, build_model(0, in_channels=3), run_config({"in_channels": 3}))
    folder = export(tmp_path / "run", tmp_path / "export")
    code = textwrap.dedent("""
        import json, sys, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
        from vchitect.diffusion.sampling import TextCondition
        g = torch.Generator().manual_seed(0)
        text = TextCondition(torch.randn(1, 4, 16, generator=g), torch.randn(1, 16, generator=g))
        frames = pipe(prompt_embeds=text, num_frames=2, height=8, width=8, num_inference_steps=2, guidance_scale=1.0,
                      output_type="pt").frames
        print(json.dumps({"pipeline": sys.modules[type(pipe).__module__].__file__, "shape": list(frames.shape),
                          "folder_code": sorted(m for m in sys.modules if m.startswith("diffusers_modules"))}))
    """)
    r = env_with_vchitect_wheel.run(["python", "-c", code, str(folder)], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["pipeline"]).is_relative_to(env_with_vchitect_wheel.site_packages), out
    assert out["folder_code"] == [] and out["shape"] == [1, 2, 3, 8, 8], out
