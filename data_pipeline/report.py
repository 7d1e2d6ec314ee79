"""``vchitect-curate report OUT``: counts per stage and reason, and score histograms as PNG."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import defaultdict

from . import io as vio


def _options(overrides: list[str] | None) -> dict:
    if not overrides:
        return {}
    from .config import renamed_storage_keys
    from vchitect.config import ConfigError, apply_overrides, from_dict
    from vchitect.data.config import S3Config

    data = apply_overrides({}, overrides)
    if "storage" in data:
        raise ConfigError(renamed_storage_keys(data["storage"]))
    return from_dict(S3Config, data.get("s3", {}), prefix="s3.").storage_options()


def collect_scores(out: str, options=None) -> dict[str, list[float]]:
    """Every filter score of the written samples, read back from the shards' json members."""
    index = json.loads(vio.read_bytes(vio.join(out, "index.json"), options))
    scores: dict[str, list[float]] = defaultdict(list)
    for shard in index["shards"]:
        data = vio.read_bytes(vio.join(out, shard["name"]), options)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    for k, v in meta.get("scores", {}).items():
                        scores[k].append(float(v))
    return dict(scores)


# x-axis label of each filter score, with its unit
SCORE_UNITS = {"sharpness": "sharpness (variance of the Laplacian over edge pixels, (grey level)²)",
               "motion": "motion (mean flow, fraction of the frame's long side per second)",
               "text_area": "text area (fraction of the frame covered by text boxes)",
               "nsfw": "nsfw (detector confidence, 0–1)", "aesthetic": "aesthetic (predicted score)"}


def histogram(plt, name: str, values: list[float], limits: dict):
    """The figure of one score: its histogram and a dashed vertical line at each configured limit."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.hist(values, bins=30, color="#4477aa")
    for kind, x in sorted(limits.items()):
        ax.axvline(x, color="#cc3311", ls="--", lw=1.2, label=f"{kind} {x:g} (filter limit)")
    if limits:
        ax.legend(fontsize=7)
    ax.set_title(f"{name} ({len(values)} clips written)")
    ax.set_xlabel(SCORE_UNITS.get(name, name))
    ax.set_ylabel("clips (count)")
    fig.tight_layout()
    return fig


def report(out: str, plots: str | None = None, overrides: list[str] | None = None, echo=print) -> list[str]:
    """Print the run's counts; write one histogram PNG per score; return the PNG paths."""
    options = _options(overrides)
    if not vio.exists(vio.join(out, "stats.json"), options):
        raise SystemExit(f"{out}: no stats.json; is this the output folder of a finished run?")
    stats = json.loads(vio.read_bytes(vio.join(out, "stats.json"), options))
    echo(f"output: {out}" + ("" if vio.exists(vio.join(out, "_SUCCESS"), options) else "  (not finished)"))
    for k, v in stats["counts"].items():
        echo(f"  {k:<16} {v}")
    echo("rejected, per stage and reason:")
    for stage, reasons in stats["rejected_by_stage"].items():
        for reason, n in reasons.items():
            echo(f"  {stage:<8} {reason:<20} {n}")
    if not stats["rejected_by_stage"]:
        echo("  none")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = plots or (os.path.join(out, "report") if not vio.is_remote(out) else "curate-report")
    os.makedirs(plots, exist_ok=True)
    paths = []
    thresholds = stats.get("thresholds", {})  # absent in outputs written before the report drew them
    for name, values in sorted(collect_scores(out, options).items()):
        fig = histogram(plt, name, values, thresholds.get(name, {}))
        path = os.path.join(plots, f"hist_{name}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    echo(f"histograms: {', '.join(paths) or 'none (no clips written)'}")
    return paths
