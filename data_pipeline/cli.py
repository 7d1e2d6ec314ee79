"""``vchitect-curate``: run a curation job, report on its output, generate a synthetic corpus.

    vchitect-curate run CONFIG [section.key=value …] [--address ADDR] [--no-progress]
    vchitect-curate report OUT [--plots DIR]
    vchitect-curate synth OUT --n N [--seed S] [--no-defects]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vchitect-curate", description=__doc__.split("\n")[0])
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
    p.add_argument("overrides", nargs="*", help="storage.* overrides for s3:// outputs")
    s = sub.add_parser("synth", help="write a synthetic raw-video corpus with planted defects")
    s.add_argument("out")
    s.add_argument("--n", type=int, default=8, help="number of clean multi-shot videos")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shots", type=int, default=2, help="shots per clean video")
    s.add_argument("--no-defects", action="store_true", help="only clean videos")
    args = ap.parse_args(argv)

    from vchitect.config import ConfigError

    try:
        if args.cmd == "run":
            from .config import load_curate_config
            from .pipeline import run

            cfg = load_curate_config(args.config, args.overrides)
            run(cfg, address=args.address, progress=not args.no_progress)
        elif args.cmd == "report":
            from .report import report

            report(args.out, args.plots, args.overrides)
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
