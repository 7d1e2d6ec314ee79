"""The demo's closing table says what its numbers are."""
from rich.console import Console

from vchitect.demo.run import LOSS_WINDOW, summary_table


def _summary() -> dict:
    probe = {"n": 4, "color": 1.0, "direction": 0.75, "both": 0.75}
    return {"corpus": {"files": 3, "clean_shots": 9}, "curate": {"clips": 9, "shards": 1, "rejected": {}},
            "train": {"steps": 40, "layout": "FSDP2", "first_loss": 1.663, "final_loss": 1.521, "step_time": 0.3},
            "export": {"max_pixel_diff": 0, "videos": 2},
            "eval": {"probe": {"train": probe, "held_out": probe},
                     "metrics": {"temporal_flickering": 0.9, "subject_consistency": 0.8,
                                 "background_consistency": 0.8, "subject_features": "pixel"}},
            "seconds": {"train": 1.0}, "out": "out/demo"}


def test_summary_labels_the_loss_as_a_mean_of_logged_steps():
    console = Console(width=400, record=True)
    console.print(summary_table(_summary()))
    text = console.export_text()
    assert f"loss (mean of first / last {LOSS_WINDOW} logged steps) 1.663 → 1.521" in text
