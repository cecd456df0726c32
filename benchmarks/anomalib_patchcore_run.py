"""anomalib's PatchCore on one MVTec-layout category, for ``benchmarks/vs_anomalib.py``.

Runs in anomalib's own virtual environment (never the project's): ``ANOMALIB_PYTHON
benchmarks/anomalib_patchcore_run.py --root R --category bottle --backbone NAME --weights FILE --out result.json``.
The backbone is the one fsad ran (``vs_anomalib.py`` passes fsad's default) at its stride-8 and stride-16 stages
(feature indices 2 and 3), the bundled ImageNet checkpoint renamed to timm's keys by fsad's own
``fewshot_core/backbones/lite_weights.py`` (loaded by file, so none of fsad's package code runs here), the
input resized (bicubic) to a square and normalised with mean = std = 0.5 as fsad does. Everything else
is anomalib's default: coreset ratio 0.1, 9 neighbours, the validation pass over the test split (its
threshold and normalisation statistics), the test pass and its metrics; the per-image visualisations
are off (fsad's evaluate writes no pictures either).

Several ``--root``/``--seed`` pairs run one after the other in this one process (a grid as a sweep runs
it: the imports once, then each setting's own model, data module and engine). Writes a JSON list to
``--out``: ``{"startup_s"}`` (the imports), then per setting ``{"image_auroc", "pixel_auroc", "fit_s",
"test_s", "setting_s", "anomalib"}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

LITE_WEIGHTS = Path(__file__).resolve().parent.parent / "fewshot_core" / "backbones" / "lite_weights.py"


def _lite_weights_module():
    spec = importlib.util.spec_from_file_location("fsad_lite_weights", LITE_WEIGHTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_backbone_weights(extractor, backbone: str, weights: Path) -> None:
    """Load the efficientnet_pytorch-style checkpoint into anomalib's timm feature extractor; every
    parameter of the extractor must come from the file (the classifier head it lacks is dropped)."""
    import timm
    import torch

    state = torch.load(weights, map_location="cpu", weights_only=True)
    lite = _lite_weights_module()
    if lite.is_efficientnet_pytorch_state_dict(state):
        with torch.device("meta"):
            full = timm.create_model(backbone, pretrained=False)
        state = lite.to_timm_state_dict(state, [len(stage) for stage in full.blocks])
    result = extractor.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise SystemExit(f"{weights}: {len(result.missing_keys)} extractor weights missing, e.g. "
                         f"{result.missing_keys[:2]}; pass the checkpoint of {backbone}")


def run_setting(root: Path, seed: int, args) -> dict:
    """One setting: anomalib's model, data module and engine made for it, fitted and tested."""
    import anomalib
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from lightning.pytorch import seed_everything
    from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

    seed_everything(seed, workers=True)
    size = (args.image_size, args.image_size)
    pre = PreProcessor(transform=Compose([Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                                          Normalize(mean=[0.5] * 3, std=[0.5] * 3)]))
    model = Patchcore(backbone=args.backbone, layers=args.layers, pre_trained=False, pre_processor=pre,
                      visualizer=False)
    load_backbone_weights(model.model.feature_extractor.feature_extractor, args.backbone, args.weights)
    data = MVTecAD(root=root, category=args.category, num_workers=args.num_workers, seed=seed)
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=args.out.parent / "anomalib_results",
                    enable_progress_bar=False)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=data)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = engine.test(model=model, datamodule=data, verbose=False)[0]
    test_s = time.perf_counter() - start
    return {"image_auroc": float(metrics["image_AUROC"]),
            "pixel_auroc": float(metrics["pixel_AUROC"]) if "pixel_AUROC" in metrics else None,
            "fit_s": fit_s, "test_s": test_s, "anomalib": anomalib.__version__,
            "train_images": len(data.train_data), "test_images": len(data.test_data)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, nargs="+", required=True,
                   help="one MVTec-layout root per setting (several: run in turn in this one process)")
    p.add_argument("--category", default="bottle")
    p.add_argument("--backbone", required=True, help="timm name of an EfficientNet-Lite (fsad's backbone)")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 3], help="timm feature indices (stride 8, 16)")
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one per --root")
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes (fsad's default too)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if len(args.seed) != len(args.root):
        p.error(f"{len(args.root)} --root but {len(args.seed)} --seed; give one seed per root")
    start = time.perf_counter()
    # the imports once per process, before any setting's clock starts
    import anomalib.data  # noqa: F401
    import anomalib.engine  # noqa: F401
    import anomalib.models  # noqa: F401
    import anomalib.pre_processing  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import torchvision.transforms.v2  # noqa: F401
    results = [{"startup_s": time.perf_counter() - start}]
    for root, seed in zip(args.root, args.seed):
        start = time.perf_counter()
        result = run_setting(root, seed, args)
        results.append({**result, "setting_s": time.perf_counter() - start})
    args.out.write_text(json.dumps(results), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
