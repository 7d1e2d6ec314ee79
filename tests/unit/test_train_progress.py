"""Rank 0's progress output without a terminal: metric lines as they are, plain progress lines."""

from vchitect.train.metrics import TrainProgress, format_line


def test_plain_progress_lines_and_unwrapped_metric_lines():
    now = [100.0]
    out: list[str] = []
    p = TrainProgress(1000, terminal=False, every=30.0, echo=out.append, clock=lambda: now[0])
    p.start(200)  # resumed at step 200: rate and ETA count this run's steps only
    line = format_line(210, {"loss": 0.1234, "grad_norm": 1.5, "lr": 1e-4, "samples_per_s": 12.3,
                             "tokens_per_s": 1027.0, "mfu": 0.41, "tflops": 405.2, "peak_mem_gib": 61.5,
                             "data_wait": 0.02})
    assert len(line) > 80
    for step in (210, 220, 230):
        now[0] += 10.0
        p.update(step, 0.1)
        p.print_metrics(line)
        p.logged(step)
    assert out[0] == line and out[1] == "train: step 210/1000 (21%), 1 steps/s, elapsed 0:00:10, ETA 0:13:10"
    assert out[2:] == [line, line]  # the next progress line only after 30 s
    now[0] += 10.0
    p.logged(240)
    assert out[-1] == "train: step 240/1000 (24%), 1 steps/s, elapsed 0:00:40, ETA 0:12:40"
    p.logged(1000)
    assert out[-1].startswith("train: step 1000/1000 (100%), ")  # the last step always
    p.stop()


def test_no_progress_lines_when_progress_is_off_or_on_a_terminal():
    out: list[str] = []
    off = TrainProgress(10, terminal=False, bar=False, echo=out.append)
    off.start(0)
    off.print_metrics("step 1 | loss 1.0")
    off.logged(10)
    assert out == ["step 1 | loss 1.0"]
    term = TrainProgress(10, terminal=True, bar=False, echo=out.append)
    term.logged(10)
    assert out == ["step 1 | loss 1.0"]


def test_on_a_terminal_metric_lines_print_above_the_bar_unbroken():
    import io
    import re

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=40, force_terminal=True, color_system=None)
    p = TrainProgress(10, terminal=True, console=console, echo=lambda _: None)
    p.start(0)
    line = "step 1 | loss 1.0000 | grad_norm 0.500 | lr 1.00e-04 | samples/s 12.3 | tokens/s 1027"
    p.print_metrics(line)
    p.stop()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert line in text  # rich's soft wrap: the terminal wraps it, rich inserts no newline
