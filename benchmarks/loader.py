"""Loader throughput per worker in decode mode, next to a raw PyAV decode of the same clips.

    .venv/bin/python benchmarks/loader.py [--samples 24] [--shapes 256x16,480px40] [--no-s3]

For each shape it writes one shard of H.264 clips (textured, moving; each clip just longer than the
bucket's span, so the loader decodes about as many frames as the raw decode), then measures
  - raw:    PyAV open + decode of every frame of each clip from memory (1 FFmpeg thread), without
            and with conversion of each frame to an RGB array (`frame.to_ndarray(format="rgb24")`)
  - local:  vchitect.data in-process (num_workers=0 = one worker) reading the shard from disk:
            tar read, decode, frame sampling at the target fps, resize + centre-crop, collate
  - s3:     the same from a local moto S3 server (in this process, so it shares the CPU)
and prints samples/s, MB/s and loader/raw. Target: loader ≥ 0.7 × raw per worker. Each figure is
the best of --repeats rounds (the rounds interleave, so load from other processes hits all alike).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.helpers_data import make_clip, sample, write_shard  # noqa: E402  (run from a checkout)
from vchitect.config import from_dict  # noqa: E402
from vchitect.data import DataConfig, ShardLoader  # noqa: E402

# name: (source w, h, bucket h, w, frames, target fps)
SHAPES = {
    "256x16": (340, 256, 256, 256, 16, 8.0),
    "480px40": (854, 480, 480, 832, 40, 16.0),
}
SRC_FPS = 24


def raw_decode(clips: list[bytes], rgb: bool) -> float:
    """Seconds to decode every frame of ``clips`` (and convert each to an RGB array if ``rgb``)."""
    import av

    t = time.perf_counter()
    for data in clips:
        with av.open(io.BytesIO(data)) as c:
            s = c.streams.video[0]
            s.codec_context.thread_count = 1
            for frame in c.decode(s):
                if rgb:
                    frame.to_ndarray(format="rgb24")
    return time.perf_counter() - t


def run_loader(cfg: DataConfig, n: int) -> tuple[float, int]:
    loader = ShardLoader(cfg)
    it = iter(loader)
    next(it)  # warm-up: opens the shard, first decode
    bytes0 = loader.metrics()["data/bytes"]
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    dt = time.perf_counter() - t
    return dt, loader.metrics()["data/bytes"] - bytes0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=24, help="samples timed per measurement")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--repeats", type=int, default=3, help="rounds per measurement; the best is kept")
    ap.add_argument("--no-s3", action="store_true", help="skip the local S3 measurement")
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    tmp = tempfile.mkdtemp(prefix="vchitect-loader-bench-")
    server = None
    if not args.no_s3:
        import s3fs
        from moto.server import ThreadedMotoServer

        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        s3 = {"endpoint_url": f"http://127.0.0.1:{port}", "region": "eu-west-1",
              "key": "bench-key", "secret": "bench-secret"}
        fs = s3fs.S3FileSystem(key=s3["key"], secret=s3["secret"],
                               client_kwargs={"endpoint_url": s3["endpoint_url"], "region_name": "eu-west-1"})
        fs.mkdir("bench")
    rows = []
    try:
        for name in args.shapes.split(","):
            sw, sh, bh, bw, frames, fps = SHAPES[name]
            n_src = int(np.ceil(((frames - 1) / fps + 0.15) * SRC_FPS)) + 1
            distinct = [make_clip(sw, sh, n_src, SRC_FPS, pattern=f"noise{i}") for i in range(4)]
            clips = [distinct[i % len(distinct)] for i in range(args.samples + 1)]
            path = write_shard(os.path.join(tmp, name, f"bench-{0:06d}.tar"),
                               [sample(f"{name}_{i:04d}", sw, sh, n_src, SRC_FPS, clip=c)
                                for i, c in enumerate(clips)])
            mb = sum(len(c) for c in clips[1:]) / 1e6
            base = {"mode": "decode", "num_workers": 0,
                    "buckets": [{"height": bh, "width": bw, "frames": frames}],
                    "fps": fps, "max_batch_size": 1, "decode_threads": 1,
                    "shuffle_buffer": 1}  # read inside the timed loop, not all at warm-up
            local = from_dict(DataConfig, {**base, "sources": [{"uri": os.path.dirname(path)}]})
            remote = None
            if server is not None:
                fs.put(path, f"bench/{name}/bench-000000.tar")
                remote = from_dict(DataConfig, {**base, "s3": s3, "sources": [{"uri": f"s3://bench/{name}"}]})
            best: dict = {}
            for _ in range(args.repeats):
                runs = {"raw": (raw_decode(clips[1:], False), mb * 1e6),
                        "raw_rgb": (raw_decode(clips[1:], True), mb * 1e6),
                        "local": run_loader(local, args.samples)}
                if remote is not None:
                    runs["s3"] = run_loader(remote, args.samples)
                for k, (dt, nbytes) in runs.items():
                    if k not in best or dt < best[k][0]:
                        best[k] = (dt, nbytes)
            rec = {"shape": name, "source": f"{sw}x{sh}x{n_src}@{SRC_FPS}", "bucket": f"{bh}x{bw}x{frames}",
                   "samples": args.samples, "clip_mb": round(mb / args.samples, 3)}
            for k, (dt, nbytes) in best.items():
                rec[f"{k}_samples_s"] = args.samples / dt
                rec[f"{k}_mb_s"] = nbytes / 1e6 / dt
            for k in ("local", "s3"):
                if k in best:
                    rec[f"{k}_ratio"] = rec[f"{k}_samples_s"] / rec["raw_samples_s"]
                    rec[f"{k}_ratio_rgb"] = rec[f"{k}_samples_s"] / rec["raw_rgb_samples_s"]
            rows.append(rec)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}),
                  flush=True)
    finally:
        if server is not None:
            server.stop()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print("| shape | source clip → bucket | raw decode | raw decode + RGB | loader, local disk | "
          "loader, local S3 |")
    print("|---|---|---|---|---|---|")
    fmt = lambda r, k: f"{r[k + '_samples_s']:.2f} ({r[k + '_mb_s']:.2f})"  # noqa: E731
    for r in rows:
        cells = [fmt(r, "raw"), fmt(r, "raw_rgb")]
        for k in ("local", "s3"):
            cells.append(f"{fmt(r, k)} — ×{r[k + '_ratio']:.2f} / ×{r[k + '_ratio_rgb']:.2f}"
                         if k + "_ratio" in r else "–")
        print(f"| {r['shape']} | {r['source']} → {r['bucket']} | " + " | ".join(cells) + " |")
    print("cells: samples/s (MB/s of shard data) per worker; ×a / ×b = loader ÷ raw decode, "
          "÷ raw decode + RGB")


if __name__ == "__main__":
    main()
