"""Tiny datasets built on the fly for tests (import as ``from _builders import ...``; pytest puts
``tests/`` on ``sys.path`` because it has no ``__init__.py``).

Images are small (default 32 px) seeded noise so tests stay fast and every file differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: int | tuple[int, int] = 32, mode: str = "RGB", seed: int = 0, **save) -> Path:
    """Seeded noise image of ``size`` (w, h) in ``mode`` ("RGB", "L", "RGBA", "I;16"); extension picks the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))  # uint16 -> mode I;16
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    img.save(path, **save)
    return path


def write_mask(path: Path, size: int | tuple[int, int] = 32, box: tuple[int, int, int, int] | None = None) -> Path:
    """0/255 mask with a filled rectangle ``box`` (x0, y0, x1, y1); default: the centre quarter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = (size, size) if isinstance(size, int) else size
    arr = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box or (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    arr[y0:y1, x0:x1] = 255
    Image.fromarray(arr).save(path)
    return path


def build_mvtec_category(
    root: Path,
    category: str = "widget",
    n_train: int = 4,
    n_test_good: int = 2,
    defects: dict[str, int] | None = None,
    masks: bool = True,
    size: int = 32,
    mode: str = "RGB",
    ext: str = ".png",
) -> Path:
    """``root/category`` in the MVTec layout; ``masks=False`` makes an image-level category (no ground_truth/)."""
    defects = {"scratch": 2, "dent": 3} if defects is None else defects
    cat = Path(root) / category
    seed = 0
    for i in range(n_train):
        write_image(cat / "train" / "good" / f"{i:03d}{ext}", size, mode, seed := seed + 1)
    for i in range(n_test_good):
        write_image(cat / "test" / "good" / f"{i:03d}{ext}", size, mode, seed := seed + 1)
    for defect, n in defects.items():
        for i in range(n):
            write_image(cat / "test" / defect / f"{i:03d}{ext}", size, mode, seed := seed + 1)
            if masks:
                write_mask(cat / "ground_truth" / defect / f"{i:03d}_mask.png", size)
    return cat


def build_folder_layout(
    base: Path,
    n_good: int = 10,
    defects: dict[str, int] | None = None,
    test_good: int = 0,
    masks: str | None = None,
    size: int = 32,
    mode: str = "RGB",
) -> dict[str, Path]:
    """Free-form folders: ``ok/``, ``ok_test/`` (if ``test_good``), ``nok/<type>/``, masks ``masks/`` laid
    out "flat" (``masks/<stem>_mask.png``) or "nested" (``masks/<type>/<stem>_mask.png``). Returns the dirs."""
    base = Path(base)
    defects = {"scratch": 2, "dent": 2} if defects is None else defects
    out = {"good_dir": base / "ok", "defect_dirs": [base / "nok" / d for d in defects]}
    seed = 100
    for i in range(n_good):
        write_image(base / "ok" / f"ok_{i:02d}.png", size, mode, seed := seed + 1)
    if test_good:
        out["test_good_dir"] = base / "ok_test"
        for i in range(test_good):
            write_image(base / "ok_test" / f"t_{i:02d}.png", size, mode, seed := seed + 1)
    if masks:
        out["mask_dir"] = base / "masks"
    for defect, n in defects.items():
        for i in range(n):
            stem = f"{defect}_{i:02d}"  # unique across types so a flat mask folder works
            write_image(base / "nok" / defect / f"{stem}.png", size, mode, seed := seed + 1)
            if masks == "flat":
                write_mask(base / "masks" / f"{stem}_mask.png", size)
            elif masks == "nested":
                write_mask(base / "masks" / defect / f"{stem}_mask.png", size)
    return out


def sweep_rows(seeds=(0, 1), category: str = "bottle"):
    """A small sweep's benchmark table, as the pipeline writes it: one-class knn, ldknn and patchcore at 1
    and 4 good shots (no threshold at 1 shot), with the decision columns (false-alarm and miss rate,
    recall per defect type), timings and logged models; knn ranks best but decides worst at 4 shots."""
    import pandas as pd

    rows = []
    quality = {"knn": (0.9994, 0.85), "ldknn": (0.9990, 0.90), "patchcore": (0.97, 0.80)}  # (AUROC, bacc)
    for method, (auroc, bacc) in quality.items():
        for shots in (1, 4):
            for seed in seeds:
                decided = shots > 1
                nan = float("nan")
                jitter = 0.01 * seed
                rows.append(dict(
                    method=method, method_name=method, backbone="tf_efficientnet_lite0", category=category,
                    protocol="oneclass", setting=f"oc-k{shots}", setting_key=f"oc-k{shots}-s{seed}", shots=shots,
                    k_good=shots, k_bad=0, label_mode=None, distance=None, seed=seed, n_support=shots,
                    n_support_good=shots, n_support_bad=0, n_query=83,
                    mlflow_run_id=f"run-{method}-{shots}-{seed}", mlflow_experiment_id="3",
                    model_uri=f"models:/m-{method}-{shots}-{seed}", feature_key=f"{category}-lite0-64",
                    image_auroc=auroc - 0.02 * (shots == 1) - jitter / 10,
                    balanced_accuracy=bacc - jitter if decided else nan,
                    false_alarm_rate=(0.25 if method == "knn" else 0.10) + jitter if decided else nan,
                    miss_rate=0.05 + jitter if decided else nan,
                    recall_broken_large=0.34 + jitter if decided else nan,
                    recall_contamination=0.37 + jitter if decided else nan,
                    recall_broken_small=0.80 + jitter if decided else nan,
                    fit_seconds=0.5 * shots, score_seconds=4.15, threshold=2.0 if decided else nan,
                    threshold_rule=f"loo fpr=0.05 n={shots}" if decided else "none: 1 good support image: ..."))
    return pd.DataFrame(rows)
