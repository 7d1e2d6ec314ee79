"""Config loading: YAML + include + dotted overrides, and errors that name key, value and what is allowed."""

import pytest

from vchitect.config import Config, ConfigError, describe, load_config, to_yaml


def test_yaml_and_overrides(tmp_path):
    cfg = load_config("configs/model/tiny.yaml", ["model.num_layers=4", "model.spatial_scale=1.0"])
    assert cfg.model.num_layers == 4 and cfg.model.spatial_scale == 1.0 and cfg.model.in_channels == 4


def test_include_merges_in_order(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  num_layers: 3\n  num_attention_heads: 2\n")
    (tmp_path / "child.yaml").write_text("include: base.yaml\nmodel:\n  num_layers: 5\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.model.num_layers, cfg.model.num_attention_heads) == (5, 2)


def test_8b_preset_inherits_from_2b():
    cfg = load_config("configs/model/vchitect-8b.yaml")
    assert cfg.model.num_attention_heads == 40 and cfg.model.joint_attention_dim == 4096


@pytest.mark.parametrize("override,pattern", [
    ("model.num_layerz=4", r"unknown key 'model.num_layerz'; did you mean 'model.num_layers'"),
    ("modle.num_layers=4", r"unknown key 'modle'"),
    ("model.num_layers=four", r"model.num_layers='four': expected an integer"),
    ("model.num_layers=true", r"model.num_layers=True: expected an integer"),
    ("model.num_layers=0", r"model.num_layers=0 is out of range; it must be >= 1"),
    ("model.qk_norm=layer", r"model.qk_norm='layer' is not allowed; choose one of 'none', 'rms_norm'"),
    ("model.spatial_scale=abc", r"model.spatial_scale='abc': expected a number"),
    ("model.num_layers", r"not of the form section.key=value"),
])
def test_errors_name_key_value_and_allowed(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("configs/model/tiny.yaml", [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("configs/model/demo.yaml")
    (tmp_path / "out.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "out.yaml") == cfg


def test_every_field_is_documented():
    for key, _type, _default, help_text in describe(Config):
        assert help_text.strip(), f"{key} has no help text"


def test_every_train_config_loads_and_fits_its_model():
    from pathlib import Path

    names = sorted(p.stem for p in Path("configs/train").glob("*.yaml"))
    assert {"demo", "image-256", "joint-256", "video-480p", "tasks-image-256", "tasks-joint-256",
            "tasks-video-480p"} <= set(names)
    for name in names:
        cfg = load_config(f"configs/train/{name}.yaml")
        cfg.check_data_fits_model()
        assert cfg.train.output_dir == f"runs/{name}" or name == "demo-shards", name


# The progressive Many-for-Many recipe (docs/tasks.md): each stage is its text-to-video stage plus tasks.
RECIPE = {"tasks-image-256": "image-256", "tasks-joint-256": "joint-256", "tasks-video-480p": "video-480p"}
# what a tasks stage may change in its text-to-video stage
TASK_KEYS = ("model.condition_", "data.mode", "data.encoders.", "data.tasks", "data.task_options.", "train.output_dir",
             "train.init_from")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "tasks":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("name", sorted(RECIPE))
def test_progressive_task_recipe_stages(name):
    from vchitect.config import to_dict
    from vchitect.data.tasks import TASKS

    cfg = load_config(f"configs/train/{name}.yaml")
    base = load_config(f"configs/train/{RECIPE[name]}.yaml")
    cfg.check_data_fits_model()  # adapter factors = the data's VAE factors, tasks with the adapter
    d = cfg.data
    assert d.mode == "decode" and cfg.model.condition_channels == 4
    assert (cfg.model.condition_vae_spatial_factor, cfg.model.condition_vae_temporal_factor) == \
        (d.vae_spatial_factor, d.vae_temporal_factor) == (8, 1)
    assert d.encoders.vae_path and d.encoders.text_encoder_kind == "sd3"
    image = {t for t, w in d.tasks.items() if w > 0 and TASKS[t].image}
    video = {t for t, w in d.tasks.items() if w > 0 and not TASKS[t].image}
    if name == "tasks-image-256":  # stage 1: image tasks only, from SD3 as image-256
        assert image >= {"t2i", "iinp", "icolor"} and not video and cfg.train.init_from == base.train.init_from
    elif name == "tasks-joint-256":  # stage 2: both, from stage 1's export
        assert image >= {"t2i", "iinp"} and video >= {"t2v", "i2v", "vinp", "itrans"} and d.image_ratio > 0
        assert cfg.train.init_from == "vchitect2:exports/tasks-image-256"
    else:  # stage 3: video tasks with some image tasks on single frames, from stage 2's export
        assert video >= {"t2v", "i2v", "vinp", "itrans"} and 0 < len(image) and d.image_ratio > 0
        assert sum(d.tasks[t] for t in video) > 0 and any(b.frames == 1 for b in d.buckets)
        assert cfg.train.init_from == "vchitect2:exports/tasks-joint-256"
    # everything else is the text-to-video stage's (stage 3 adds image buckets and image_ratio)
    allowed = TASK_KEYS + (("data.buckets", "data.image_ratio") if name == "tasks-video-480p" else ())
    got, want = _flat(to_dict(cfg)), _flat(to_dict(base))
    changed = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    assert changed and all(k.startswith(allowed) for k in changed), changed


def test_data_that_does_not_fit_the_model_is_named():
    cfg = load_config("configs/train/image-256.yaml", ["data.text.dim=768"])
    with pytest.raises(ConfigError, match="data.text.dim=768 does not match model.joint_attention_dim=4096"):
        cfg.check_data_fits_model()


def test_credentials_are_never_printed():
    cfg = load_config("configs/train/demo.yaml", ["data.s3.key=AKIASECRETKEY", "data.s3.secret=hunter2"])
    text = to_yaml(cfg)
    assert "AKIASECRETKEY" not in text and "hunter2" not in text and "<redacted>" in text
    assert cfg.data.s3.key == "AKIASECRETKEY"  # the run itself still has them


def test_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads `3e-4` as a string; a float field still takes it.
    (tmp_path / "c.yaml").write_text("train:\n  lr: 3e-4\n")
    assert load_config(tmp_path / "c.yaml", ["train.eps=1e-6"]).train.lr == 3e-4


def test_docs_list_every_config_key():
    from pathlib import Path

    text = Path("docs/configs.md").read_text()
    missing = [key for key, *_ in describe(Config) if f"`{key}`" not in text]
    assert not missing, f"docs/configs.md lacks {missing}; regenerate it with `vchitect config describe`"


def test_curation_docs_list_every_curate_key():
    from pathlib import Path

    from data_pipeline.config import CurateConfig

    text = Path("docs/curation.md").read_text()
    missing = [key for key, *_ in describe(CurateConfig) if f"| `{key}` |" not in text]
    assert not missing, f"docs/curation.md lacks {missing}; regenerate it with `vchitect-curate config describe`"


def test_demo_preset_builds_its_position_table_for_its_own_patch_grid():
    # The demo learns where a shape is only if neighbouring patches are far apart in the sin-cos
    # table: a larger table centre-cropped to the 4×4 grid spaced them 0.25 apart, and the full
    # demo then made checkered fragments with direction at chance (docs/demo.md, Design).
    m = load_config("configs/model/demo.yaml").model
    assert m.pos_embed_max_size == m.sample_size // m.patch_size
    assert m.frame_pos_embed == "sincos"
