"""Feature-store throughput: raw backbone forward vs the full store build from PNG, on the same images.

    .venv/bin/python benchmarks/embed_throughput.py [--root ../shared/data/mvtec_ad] [--category bottle]

(a) the extractor's forward pass (stage maps + global embedding) on pre-decoded, pre-resized tensors;
(b) ``FeatureStore.build`` from the PNG files: DataLoader workers decode + resize while the main process
    runs the same forward pass and PatchCore patch features, and a writer thread hashes and writes the
    float16 arrays (content fingerprint of the images and checksums included).
Both in images/s and their ratio (target >= 0.8: decoding must overlap the forward pass); (a) is timed
before and after (b) and averaged, since other users' load on a shared machine drifts. Also the
peak memory of building the full store, measured in a fresh process: VmRSS/VmHWM of the builder,
its anonymous memory, and the largest decoding worker.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from fewshot_core.features.store import EmbedCompute, FeatureSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status_kb(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child_build(args) -> None:
    """Run in a fresh process: build the store once, report timing and peak memory as JSON."""
    import torch

    from fewshot_core.data.mvtec import load_category
    from fewshot_core.features import FeatureStore

    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_category(args.root, args.category)
    if args.limit:
        dataset.records = dataset.records[: args.limit]
    peak_anon = [0]
    done = threading.Event()

    def sample():  # RssAnon: the builder's own memory, without file-backed pages the kernel can drop
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status_kb("RssAnon"))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rss_before = _status_kb("VmRSS")
    started = time.perf_counter()
    part = FeatureStore(args.store).build(dataset, FeatureSpec(image_size=args.image_size),
                                          EmbedCompute(args.batch_size, args.num_workers, args.device, progress=False))
    wall = time.perf_counter() - started
    done.set()
    thread.join()
    print(json.dumps({
        "n": len(part), "build_s": part.meta["build"]["seconds"], "wall_s": wall, "cache_hit": part.cache_hit,
        "hwm_mb": _status_kb("VmHWM") / 1024, "rss_before_mb": rss_before / 1024,
        "anon_peak_mb": peak_anon[0] / 1024,
        "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "patch_mb": (part.path / "patch.npy").stat().st_size / 2**20,
        "global_mb": (part.path / "global.npy").stat().st_size / 2**20,
        "device": part.meta["build"]["device"], "grid": part.grid, "patch_dim": part.patch_dim,
    }))


def raw_forward_runner(args, paths):
    """Decode + resize ``paths`` once; return a function timing the extractor alone on those tensors (images/s)."""
    import torch

    from fewshot_core.backbones import create_extractor
    from fewshot_core.backbones.preprocess import Normalize, preprocess_config, resize_image, to_uint8_tensor
    from fewshot_core.data.imageio import load_rgb

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preprocess_config("tf_efficientnet_lite0")
    images = torch.stack([to_uint8_tensor(resize_image(load_rgb(p), args.image_size, cfg["interpolation"]))
                          for p in paths])
    ext = create_extractor("tf_efficientnet_lite0", device=args.device)
    norm = Normalize(cfg["mean"], cfg["std"])
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]

    def run(batch):
        x = norm(batch.to(ext.device))
        if ext.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                ext.forward_with_global(x)
            torch.cuda.synchronize()
        else:
            ext.forward_with_global(x)

    def measure() -> float:
        with torch.inference_mode():
            run(batches[0])  # warm-up (kernel selection), not timed
            started = time.perf_counter()
            for batch in batches:
                run(batch)
            return len(images) / (time.perf_counter() - started)

    return measure


def main() -> None:
    from fewshot_core.paths import shared_mvtec_root

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=shared_mvtec_root())
    p.add_argument("--category", default="bottle")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default=None)
    p.add_argument("--limit", type=int, default=0, help="first N images only (0 = all, e.g. bottle's 292)")
    p.add_argument("--rounds", type=int, default=0,
                   help="also N alternating rounds (a), (b) in this process, each (b) bracketed by two (a)")
    p.add_argument("--child-build", dest="store", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.root is None:
        sys.exit("no MVTec AD root: pass --root or set MVTEC_ROOT")
    if args.store is not None:
        return child_build(args)

    from fewshot_core.data.mvtec import load_category

    dataset = load_category(args.root, args.category)
    records = dataset.records[: args.limit] if args.limit else dataset.records
    n = len(records)
    # (a) runs before and after (b) and the mean is used: other users' load on a shared machine drifts
    measure = raw_forward_runner(args, [r.path for r in records])
    load_before = os.getloadavg()[0]
    raw_before = measure()
    with tempfile.TemporaryDirectory(prefix="fsad-bench-") as store:
        cmd = [sys.executable, __file__, "--root", str(args.root), "--category", args.category,
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--num-workers", str(args.num_workers), "--threads", str(args.threads),
               "--limit", str(args.limit), "--child-build", store]
        if args.device:
            cmd += ["--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ}).stdout
        build = json.loads(out.strip().splitlines()[-1])
    raw_after = measure()
    raw_ips = (raw_before + raw_after) / 2
    build_ips = build["n"] / build["build_s"]
    load = (load_before + os.getloadavg()[0]) / 2

    print(f"\nembed throughput: {args.category}, {n} images ({', '.join(sorted({r.split for r in records}))}), "
          f"tf_efficientnet_lite0 bundled weights, {args.image_size} px, batch {args.batch_size}, "
          f"{args.num_workers} decode workers, device {build['device']}, torch threads "
          f"{args.threads or 'default'}, {os.cpu_count()} CPUs, mean 1-min load average {load:.1f}")
    rows = [
        ("(a) raw forward, pre-decoded tensors (mean of before/after b)",
         f"{raw_ips:.2f} images/s"),
        ("    (a) before / after (b)", f"{raw_before:.2f} / {raw_after:.2f}"),
        ("(b) store build from PNG (decode+resize+forward+patch+write)", f"{build_ips:.2f} images/s"),
        ("ratio (b)/(a)  [target >= 0.8]", f"{build_ips / raw_ips:.2f}"),
        (f"store build wall time, {build['n']} images", f"{build['wall_s']:.1f} s"),
        ("peak RSS builder process (VmHWM)", f"{build['hwm_mb']:.0f} MB"),
        ("peak anonymous memory builder (RssAnon)", f"{build['anon_peak_mb']:.0f} MB"),
        ("builder RSS before build (model + libraries)", f"{build['rss_before_mb']:.0f} MB"),
        ("peak RSS largest decode worker", f"{build['worker_peak_mb']:.0f} MB"),
        (f"store size: patch.npy {tuple(build['grid'])}x{build['patch_dim']} fp16 + global.npy",
         f"{build['patch_mb']:.0f} MB + {build['global_mb']:.1f} MB"),
    ]
    width = max(len(r[0]) for r in rows)
    print("-" * (width + 20))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>16}")
    if args.rounds:
        interleaved(args, dataset, records, measure)


def interleaved(args, dataset, records, measure) -> None:
    """(a), (b), (a), (b), ..., (a): each build is compared with the forward runs just before and after it."""
    from dataclasses import replace

    from fewshot_core.features import FeatureStore

    subset = replace(dataset, records=list(records))
    raws, ratios = [measure()], []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="fsad-bench-") as store:
            compute = EmbedCompute(args.batch_size, args.num_workers, args.device, progress=False)
            part = FeatureStore(store).build(subset, FeatureSpec(image_size=args.image_size), compute)
        raws.append(measure())
        build_ips = part.meta["build"]["images_per_s"]
        ratios.append(build_ips / ((raws[-2] + raws[-1]) / 2))
        print(f"round {i + 1}: (a) {raws[-2]:.2f} | (b) {build_ips:.2f} | (a) {raws[-1]:.2f} images/s "
              f"-> ratio {ratios[-1]:.2f}", flush=True)
    print(f"interleaved ratio (b)/(a): median {sorted(ratios)[len(ratios) // 2]:.2f} over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
