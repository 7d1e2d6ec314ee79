"""The training loop and its parts: optimizer and schedule, EMA, DCP checkpoints, metrics, signals."""
