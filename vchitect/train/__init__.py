"""The training loop and its parts: optimizer and schedule, EMA, DCP checkpoints, metrics, signals."""

import vchitect.config  # noqa: F401  first: it imports .config back for Config.train
