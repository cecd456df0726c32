"""Predict throughput: ``fsad predict``'s scoring end to end from PNG vs the raw backbone forward, same images.

    .venv/bin/python benchmarks/predict_throughput.py [--root ../shared/data/mvtec_ad] [--category bottle]
        [--image-size 256] [--images 48] [--shots 1] [--threads N]

(a) the extractor's forward pass (stage maps + global embedding) on pre-decoded, pre-resized tensors in
    the batches predict uses;
(b) ``fewshot_core.cli.predict.predict_files`` with a PatchCore model (fitted on ``--shots`` good train
    images, saved and reloaded as a deployable folder): PNG decode, resize, the same forward pass, patch
    features, nearest-neighbour scoring; overlays off.
Both in images/s and their ratio (target >= 0.7). (a) is timed before and after (b) and averaged, since
other users' load on a shared machine drifts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="MVTec AD root (default MVTEC_ROOT or ../shared)")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--images", type=int, default=48, help="test images scored")
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
    from fewshot_core.models.deployable import DeployedModel, save_deployable
    from fewshot_core.models.featurizer import FeaturizerSpec
    from fewshot_core.paths import shared_mvtec_root

    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.root or shared_mvtec_root()
    ds = load_dataset(root, args.category)
    with tempfile.TemporaryDirectory(prefix="fsad-predict-bench-") as tmp:
        store = FeatureStore(args.store or Path(tmp) / "store")
        part = store.build(ds, image_size=args.image_size, progress=False)
        ep = sample_oneclass(ds, args.shots, 0)
        details: dict = {}
        run_oneclass_episode(ds, part, ep, "patchcore", {}, mask_size=args.image_size, details=details)
        folder = save_deployable(details["model"], Path(tmp) / "model", category=ds.category,
                                 support_ids=ep.support_ids, protocol="oneclass",
                                 featurizer=FeaturizerSpec.from_partition(part), threshold=details["threshold"])
        model = DeployedModel(folder)
        paths = [ds.by_id(i).path for i in ep.query_ids][: args.images]
        featurizer = model.featurizer
        pixels = featurizer.pixels([load_rgb(p) for p in paths])  # decoded + resized once, outside (a)'s clock

        @torch.inference_mode()
        def forward() -> float:
            t0 = time.perf_counter()
            for s in range(0, len(pixels), SCORE_BATCH):
                featurizer.extractor.forward_with_global(featurizer.normalize(pixels[s:s + SCORE_BATCH]))
            return len(pixels) / (time.perf_counter() - t0)

        forward()  # warm-up (allocator, kernels)
        before = forward()
        t0 = time.perf_counter()
        rows = predict_files(model, paths, out=None, overlays=False, progress=False)
        predict = len(rows) / (time.perf_counter() - t0)
        after = forward()
    raw = (before + after) / 2
    result = {"category": args.category, "image_size": args.image_size, "images": len(paths), "shots": args.shots,
              "backbone": part.meta["backbone"], "torch_threads": torch.get_num_threads(),
              "forward_img_s": round(raw, 2), "forward_before": round(before, 2), "forward_after": round(after, 2),
              "predict_img_s": round(predict, 2), "ratio": round(predict / raw, 3)}
    print("| images | size | forward img/s (before/after) | predict img/s | ratio |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {len(paths)} | {args.image_size} | {raw:.2f} ({before:.2f}/{after:.2f}) | {predict:.2f} | "
          f"{predict / raw:.3f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
