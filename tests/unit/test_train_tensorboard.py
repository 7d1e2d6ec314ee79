"""TensorBoard from MetricWriter: training scalars under train/, data ones under data/, the config as hparams."""
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.metadata import SESSION_START_INFO_TAG, parse_session_start_info_plugin_data

from vchitect.train.metrics import MetricWriter


def test_scalars_are_prefixed_and_the_config_is_logged_as_hparams(tmp_path):
    config = {"train": {"lr": 1e-3, "steps": 2, "progress": False}, "data": {"buckets": [{"height": 8}]},
              "model": {"depth": 2, "init": None}}
    writer = MetricWriter(tmp_path, True, True, "disabled", "p", config, printer=lambda line: None)
    writer.log(1, {"loss": 1.5, "samples_per_s": 3.0, "data/samples": 4, "data/skipped/undecodable": 0})
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/samples_per_s", "data/samples", "data/skipped/undecodable"} <= tags
    assert "loss" not in tags and "train/data/samples" not in tags
    assert acc.Scalars("train/loss")[0].value == 1.5
    raw = acc.PluginTagToContent("hparams")[SESSION_START_INFO_TAG]
    hp = parse_session_start_info_plugin_data(raw).hparams
    assert hp["train.lr"].number_value == 1e-3 and hp["model.depth"].number_value == 2
    assert hp["data.buckets"].string_value == '[{"height": 8}]' and hp["model.init"].string_value == "null"
    assert "train.steps: 2" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
