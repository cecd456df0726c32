"""Predict throughput: ``fsad predict``'s scoring end to end from PNG vs the raw backbone forward, same images.

    .venv/bin/python benchmarks/predict_throughput.py [--root ../shared/data/mvtec_ad] [--category bottle]
        [--image-size 256] [--images 0 (all test images)] [--shots 1] [--threads N] [--rounds 3]

(a) the extractor's forward pass (stage maps + global embedding) on pre-decoded, pre-resized tensors in
    the batches predict uses;
(b) ``fewshot_core.cli.predict.predict_files`` with a PatchCore model (fitted on ``--shots`` good train
    images, saved and reloaded as a deployable folder): PNG decode, resize, the same forward pass, patch
    features, nearest-neighbour scoring; overlays off.
Both in images/s and their ratio (target >= 0.7). Each round times (a), (b), (a) and takes (b) over the
mean of its two (a); the ratio reported is the median over ``--rounds``, since other users' load on a
shared machine drifts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fewshot_core.evaluation.options import EpisodeOptions
from fewshot_core.features.store import EmbedCompute, FeatureSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="MVTec AD root (default MVTEC_ROOT or ../shared)")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--images", type=int, default=0, help="test images scored (0: all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--store", type=Path, default=None, help="feature store folder (default a temp folder)")
    args = ap.parse_args()

    import torch

    from fewshot_core.cli.predict import predict_files
    from fewshot_core.data import load_dataset
    from fewshot_core.data.imageio import load_rgb
    from fewshot_core.episodes import sample_oneclass
    from fewshot_core.evaluation.oneclass import SCORE_BATCH, run_oneclass_episode
    from fewshot_core.features.store import FeatureStore
    from fewshot_core.models.deployable import DeployedModel, ModelInputs, Provenance, save_deployable
    from fewshot_core.models.featurizer import FeaturizerSpec
    from fewshot_core.paths import shared_mvtec_root

    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.root or shared_mvtec_root()
    ds = load_dataset(root, args.category)
    with tempfile.TemporaryDirectory(prefix="fsad-predict-bench-") as tmp:
        store = FeatureStore(args.store or Path(tmp) / "store")
        part = store.build(ds, FeatureSpec(image_size=args.image_size), EmbedCompute(progress=False))
        ep = sample_oneclass(ds, args.shots, 0)
        res = run_oneclass_episode(ds, part, ep, "patchcore", {}, options=EpisodeOptions(mask_size=args.image_size))
        folder = save_deployable(res.model, Path(tmp) / "model", Provenance(ds.category, ep.support_ids, "oneclass"),
                                 ModelInputs(featurizer=FeaturizerSpec.from_partition(part)), res.threshold)
        model = DeployedModel(folder)
        paths = [ds.by_id(i).path for i in ep.query_ids][: args.images or None]
        featurizer = model.featurizer
        pixels = featurizer.pixels([load_rgb(p) for p in paths])  # decoded + resized once, outside (a)'s clock

        @torch.inference_mode()
        def forward() -> float:
            t0 = time.perf_counter()
            for s in range(0, len(pixels), SCORE_BATCH):
                featurizer.extractor.forward_with_global(featurizer.normalize(pixels[s:s + SCORE_BATCH]))
            return len(pixels) / (time.perf_counter() - t0)

        forward()  # warm-up (allocator, kernels)
        rounds = []
        for _ in range(args.rounds):
            before = forward()
            t0 = time.perf_counter()
            rows = predict_files(model, paths, out=None, overlays=False, progress=False)
            predict = len(rows) / (time.perf_counter() - t0)
            after = forward()
            rounds.append((before, predict, after, predict / ((before + after) / 2)))
    median = float(np.median([r[3] for r in rounds]))
    result = {"category": args.category, "image_size": args.image_size, "images": len(paths), "shots": args.shots,
              "backbone": part.meta["backbone"], "torch_threads": torch.get_num_threads(),
              "rounds": [{"forward_before": round(b, 2), "predict_img_s": round(p, 2), "forward_after": round(a, 2),
                          "ratio": round(r, 3)} for b, p, a, r in rounds], "median_ratio": round(median, 3)}
    print(f"predict throughput: {args.category}, {len(paths)} test images, {args.image_size} px, "
          f"{torch.get_num_threads()} torch threads")
    print("| round | forward img/s (before/after) | predict img/s | ratio |")
    print("|---:|---:|---:|---:|")
    for k, (b, p, a, r) in enumerate(rounds, 1):
        print(f"| {k} | {(b + a) / 2:.2f} ({b:.2f}/{a:.2f}) | {p:.2f} | {r:.3f} |")
    print(f"median ratio [target >= 0.7]: {median:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
