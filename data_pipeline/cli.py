"""``vchitect-curate``: run a curation job, report on its output, generate a synthetic corpus.

    vchitect-curate run CONFIG [section.key=value …] [--address ADDR] [--no-progress]
    vchitect-curate report OUT [--plots DIR]
    vchitect-curate synth OUT --n N [--seed S] [--no-defects]
    vchitect-curate synth OUT --removal --n N [--seed S]   synthetic removal pairs, as shards
    vchitect-curate synth OUT --depth --n N [--seed S]     synthetic shots with exact depth.mp4, as shards
    vchitect-curate config show CONFIG [section.key=value …]
    vchitect-curate config describe
    vchitect-curate --version

``--help``, ``--version`` and ``config`` import no torch, Ray or model code.
"""

from __future__ import annotations

import argparse
import sys

from vchitect.cli import VersionAction


def cmd_config(args) -> int:
    """``config show``: the resolved config as YAML (credentials redacted; empty input/output paths
    are allowed here, with a note, since the presets leave them to the command line);
    ``config describe``: every key as a Markdown table (docs/curation.md, "Config reference")."""
    from vchitect.config_base import reference_table, to_yaml

    from .config import CurateConfig, load_curate_config

    if args.config_cmd == "describe":
        sys.stdout.write(reference_table(CurateConfig))
        return 0
    cfg = load_curate_config(args.config, args.overrides, require_paths=False)
    sys.stdout.write(to_yaml(cfg))
    for key, what in cfg.missing_paths().items():
        print(f"vchitect-curate: note: {key} is empty; `run` needs {what} (e.g. {key}=… on its command line)",
              file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `vchitect-curate` argument parser (also used to check the commands the docs show)."""
    ap = argparse.ArgumentParser(prog="vchitect-curate", description="Curate raw videos into WebDataset "
                                 "shards, report on an output, generate a synthetic corpus (docs/curation.md).")
    ap.add_argument("--version", action=VersionAction)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="curate raw videos into WebDataset shards")
    r.add_argument("config", help="YAML config (see configs/curate/)")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output.path=/data/shards")
    r.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    r.add_argument("--no-progress", action="store_true", help="no progress display (terminal) or lines (log)")
    p = sub.add_parser("report", help="counts per stage / reason and score histograms of an output")
    p.add_argument("out", help="output folder of a run (local or s3://)")
    p.add_argument("--plots", default=None, help="folder for the histogram PNGs (default OUT/report, "
                   "or ./curate-report for s3:// outputs)")
    p.add_argument("overrides", nargs="*", help="s3.* overrides for s3:// outputs")
    s = sub.add_parser("synth", help="write a synthetic raw-video corpus with planted defects")
    s.add_argument("out")
    s.add_argument("--n", type=int, default=8, help="number of clean multi-shot videos")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shots", type=int, default=2, help="shots per clean video")
    s.add_argument("--no-defects", action="store_true", help="only clean videos")
    kind = s.add_mutually_exclusive_group()
    kind.add_argument("--removal", action="store_true", help="instead: N synthetic object-removal pairs (target "
                      "mp4, src.mp4, mask.mp4, instruction txt) written straight as WebDataset shards "
                      "(docs/data.md, \"Removal pairs\")")
    kind.add_argument("--depth", action="store_true", help="instead: N synthetic shots with their exact depth "
                      "(mp4, depth.mp4, caption txt) written straight as WebDataset shards (docs/data.md, "
                      "\"Depth maps\")")
    c = sub.add_parser("config", help="inspect curation configs")
    config_sub = c.add_subparsers(dest="config_cmd", required=True)
    c_show = config_sub.add_parser("show", help="print the resolved config (file + overrides)")
    c_show.add_argument("config", help="YAML config (see configs/curate/)")
    c_show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. clip.max_duration=5")
    config_sub.add_parser("describe", help="print every config key with type, default and meaning (Markdown)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from vchitect.config_base import ConfigError

    try:
        if args.cmd == "config":
            return cmd_config(args)
        if args.cmd == "run":
            from .config import load_curate_config
            from .pipeline import run

            cfg = load_curate_config(args.config, args.overrides)
            run(cfg, address=args.address, progress=not args.no_progress)
        elif args.cmd == "report":
            from .report import report

            report(args.out, args.plots, args.overrides)
        elif args.removal:
            from vchitect.demo.removal import write_removal_shards

            index = write_removal_shards(args.out, args.n, seed=args.seed)
            print(f"wrote {index['nsamples']} removal pairs in {len(index['shards'])} shard(s) to {args.out}")
        elif args.depth:
            from vchitect.demo.depth import write_depth_shards

            index = write_depth_shards(args.out, args.n, seed=args.seed)
            print(f"wrote {index['nsamples']} depth shots in {len(index['shards'])} shard(s) to {args.out}")
        else:
            from .synthetic import generate_corpus

            truth = generate_corpus(args.out, n=args.n, seed=args.seed, shots_per_video=args.shots,
                                    defects=not args.no_defects)
            print(f"wrote {len(truth['videos'])} files to {args.out}/videos "
                  f"({truth['expected_clips']} clean shots); manifest: {args.out}/manifest.jsonl")
    except ConfigError as exc:
        print(f"vchitect-curate: config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
