"""``vchitect demo``: the synthetic world end to end on one CPU machine (docs/demo.md).

    run.py      the stages (corpus → curation → 2-rank training → sampling → export → eval) and the summary
    corpus.py   the demo's raw corpus: learnable shots, the held-out combinations, the trajectory
    smoke.py    ``vchitect demo --smoke``: one forward + backward of the demo model

The names users and scripts reach for are re-exported here.
"""

from .run import DemoSettings, run_demo, text_encoder_path

__all__ = ["DemoSettings", "run_demo", "text_encoder_path"]
