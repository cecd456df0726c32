"""``fsad predict``: score new images with a logged or registered model, offline.

    fsad predict IMAGES_OR_FOLDER... --model models:/fsad-bottle@champion [--out DIR]

Writes ``DIR/predictions.csv`` and ``DIR/predictions.json`` (image, image_score, decision, threshold,
label, error, overlay) and, for one-class detectors, an anomaly-map overlay PNG per image under
``DIR/overlays/``. A file that is not an image or cannot be read gets a one-line error (on stderr and in
its row) and the other images are still scored; the exit code is then 1.

Folders are walked without dot-folders and without output folders of ``fsad predict`` (``DIR`` itself,
or any folder holding its lock file), so predicting ``.`` twice never scores the first run's overlays.
One run at a time writes to a ``DIR`` (a second is refused); the overlays of a run replace those of
the previous one as a whole.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_core.atomic import atomic_write_bytes, replace_dir
from fewshot_core.cli.args import folder
from fewshot_core.data.imageio import is_image_file, load_rgb, not_regular_message, special_file_kind
from fewshot_core.errors import FsadError
from fewshot_core.locking import LockBusy, file_lock
from fewshot_core.models.trust import load_verified
from fewshot_core.processes import pid_alive


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="score images with a logged model (MLflow URI or folder)",
                              description="Score image files (or every image under folders) with a model: "
                                          "models:/fsad-<category>@champion, runs:/<run>/model, models:/<id> or "
                                          "a local model folder.")
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER", help="image files and/or folders (recursive)")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/fsad-bottle@champion")
    p.add_argument("--out", type=folder, default="fsad-predictions", help="output folder (default ./fsad-predictions)")
    p.add_argument("--no-overlays", action="store_true", help="skip the anomaly-map overlay PNGs")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default MLFLOW_TRACKING_URI or "
                                                        "dagster_home/mlflow.db)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


LOCK_NAME = ".fsad-predict.lock"  # in the output folder: one run at a time, and the mark of an output folder
OVERLAYS = "overlays"
_OVERLAY_NAME = re.compile(r"\d{5}_.*\.png")  # what ``predict_files`` writes there
_STAGING = ".overlays-"  # a run's overlays before they replace the previous run's: .overlays-<pid>-<hex>


def _walk(root: Path, skip: Path | None) -> list[Path]:
    """Every non-dot file under ``root`` (symbolic links followed, each folder once), leaving out
    dot-folders, ``skip`` and every folder that holds a ``fsad predict`` lock file (an output folder)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = here.resolve()
        if real in seen or real == skip or (here / LOCK_NAME).exists():
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [here / name for name in filenames if not name.startswith(".")]
    return sorted(found)


def collect(inputs, out: Path | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(image files in order, [(path, error)] for inputs that are missing, not images or not regular
    files); folders are walked as ``_walk`` says, ``out`` (the output folder) left out."""
    images, bad = [], []
    skip = Path(out).resolve() if out is not None else None

    def consider(path: Path) -> None:
        if not is_image_file(path):
            bad.append((path, f"{path}: not an image file (use .png, .jpg, .bmp, .tif or .webp); skipped"))
        elif (kind := special_file_kind(path)) is not None:  # a FIFO would block the reader forever
            bad.append((path, not_regular_message(path, kind)))
        else:
            images.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for p in _walk(path, skip):
                consider(p)
        elif not path.exists():
            bad.append((path, f"{path}: file not found"))
        else:
            consider(path)
    return images, bad


def load_deployed(uri: str, tracking_uri: str | None = None):
    """The ``DeployedModel`` behind a model URI, a logged MLflow model folder or a deployable folder, every
    model file verified before anything is loaded (``fewshot_core.models.trust``)."""
    return load_verified(uri, tracking_uri)


def overlay_png(image, amap: np.ndarray, threshold: float | None) -> bytes:
    """The image at the map's size with the anomaly map blended over it (jet; red = anomalous).

    With a threshold the colour scale is fixed around it (0.5x .. 1.5x), so colours compare across
    images; without one each map is scaled to its own range."""
    from matplotlib import colormaps  # matplotlib: only when overlays are drawn

    size = amap.shape[-1]
    lo, hi = (0.5 * threshold, 1.5 * threshold) if threshold else (float(amap.min()), float(amap.max()))
    norm = np.clip((amap - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    heat = colormaps["jet"](norm)[..., :3]
    base = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
    blend = (0.55 * base + 0.45 * heat) * 255.0
    buf = io.BytesIO()
    Image.fromarray(blend.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def predict_files(model, images: list[Path], out: Path | None = None, overlays: bool = True,
                  progress: bool = True, staging: Path | None = None) -> list[dict]:
    """One result row per image; unreadable images get their error and the rest are still scored.

    Overlays are named ``out/overlays/<n>_<stem>.png`` in the rows; ``staging``: write them there
    instead (the caller moves that folder into place)."""
    from tqdm.auto import tqdm  # with the scorer (torch): not for --help

    from fewshot_core.evaluation.oneclass import SCORE_BATCH

    rows = []
    want_maps = overlays and out is not None and model.is_detector
    chunks = [images[start:start + SCORE_BATCH] for start in range(0, len(images), SCORE_BATCH)]

    def decode(index: int) -> tuple[list, object]:
        """(position, path, image or the error) of chunk ``index``, and the model's prepared input for the
        images that decoded."""
        got = []
        for i, path in enumerate(chunks[index], index * SCORE_BATCH):
            try:
                got.append((i, path, load_rgb(path)))
            except FsadError as exc:
                got.append((i, path, exc))
        ok = [img for _, _, img in got if not isinstance(img, FsadError)]
        return got, model.prepare(ok) if ok else None

    bar = tqdm(total=len(images), unit="img", desc="predict", disable=not progress)
    # The next chunk is decoded and resized in a thread while this one is scored: PNG decoding and PIL's
    # resize release the GIL, so they overlap the forward pass as the store's DataLoader workers do.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsad-decode")
    try:
        pending = pool.submit(decode, 0) if chunks else None
        for index in range(len(chunks)):
            got, prepared = pending.result()
            pending = pool.submit(decode, index + 1) if index + 1 < len(chunks) else None
            decoded = []
            for i, path, img in got:
                if isinstance(img, FsadError):  # through the bar, so the line is not glued to it
                    bar.write(f"fsad: error: {img}", file=sys.stderr)
                    rows.append({"image": str(path), "error": str(img)})
                else:
                    decoded.append((i, path, img))
            if decoded:
                res = model.score([img for _, _, img in decoded], maps=want_maps, prepared=prepared)
                for j, (i, path, img) in enumerate(decoded):
                    row = {"image": str(path), "image_score": float(res.image_score[j]),
                           "decision": None if res.decision[j] is None else ("anomalous" if res.decision[j] else "good"),
                           "threshold": res.threshold, "label": None if res.label is None else res.label[j],
                           "error": None}
                    if want_maps:
                        name = f"{i:05d}_{path.stem}.png"  # index: stems repeat
                        target = (staging or out / OVERLAYS) / name
                        target.parent.mkdir(parents=True, exist_ok=True)
                        atomic_write_bytes(target, overlay_png(img, res.anomaly_map[j], res.threshold))
                        row["overlay"] = str(out / OVERLAYS / name)
                    rows.append(row)
            bar.update(len(chunks[index]))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return rows


def write_results(rows: list[dict], out: Path) -> tuple[Path, Path]:
    import pandas as pd  # pandas: not for --help

    out.mkdir(parents=True, exist_ok=True)
    cols = ["image", "image_score", "decision", "threshold", "label", "error", "overlay"]
    frame = pd.DataFrame(rows).reindex(columns=cols)
    csv, js = out / "predictions.csv", out / "predictions.json"
    atomic_write_bytes(csv, frame.to_csv(index=False).encode())
    records = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
               for r in frame.to_dict(orient="records")]
    atomic_write_bytes(js, json.dumps(records, indent=1).encode())
    return csv, js


def _check_overlays(folder: Path) -> None:
    """The previous run's overlay folder may be replaced only when it holds nothing but overlays."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FsadError(f"{folder} is a file, not a folder; move it away or pass another --out")
    foreign = sorted(p.name for p in folder.iterdir() if not (_OVERLAY_NAME.fullmatch(p.name) and p.is_file()))
    if foreign:
        raise FsadError(f"{folder / foreign[0]}: not an overlay written by fsad predict (the folder is replaced on "
                        "each run); move it away or pass another --out")


def _remove_dead_staging(out: Path) -> None:
    """Staging folders left by runs that died (kill -9): their pid is no longer alive."""
    for tmp in out.glob(f"{_STAGING}*"):
        pid = tmp.name[len(_STAGING):].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def run(args) -> int:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f"{_STAGING}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        try:  # two runs into one folder would overwrite each other's table: the second is refused
            stack.enter_context(file_lock(out / LOCK_NAME, wait=False))
        except LockBusy as exc:
            raise FsadError(f"{out}: another fsad predict (pid {exc.holder}) is writing there; wait for it to "
                            "finish or pass another --out") from None
        stack.callback(shutil.rmtree, staging, ignore_errors=True)
        _check_overlays(out / OVERLAYS)
        _remove_dead_staging(out)
        images, bad = collect(args.inputs, out)
        for _, message in bad:
            print(f"fsad: error: {message}", file=sys.stderr)
        if not images:
            raise FsadError("no images to score among " + ", ".join(args.inputs))
        model = load_deployed(args.model, args.tracking_uri)
        rows = predict_files(model, images, out, overlays=not args.no_overlays, progress=not args.no_progress,
                             staging=staging)
        rows += [{"image": str(p), "error": m} for p, m in bad]
        if staging.is_dir():
            replace_dir(staging, out / OVERLAYS)
        elif (out / OVERLAYS).is_dir():  # this run wrote none: the previous run's would describe other images
            shutil.rmtree(out / OVERLAYS)
        csv, js = write_results(rows, out)
    failed = sum(1 for r in rows if r.get("error"))
    scored = len(rows) - failed
    print(f"scored {scored} image(s), {failed} failed; {threshold_summary(model)}; wrote {csv} and {js}")
    return 1 if failed else 0


def threshold_summary(model) -> str:
    """The threshold the decisions rest on, with the rule that set it: the false-alarm rate it stands
    behind, or that its support could not certify the rate asked; or why there is none."""
    t = model.threshold if model.is_detector else None
    if t is None:
        return "threshold none"
    if not t.usable:
        return f"threshold none ({t.reason or t.rule})"
    note = "" if t.fpr_bound is not None else "; recorded before thresholds stated a false-alarm bound"
    return f"threshold {t.value:.6g} ({t.rule}{note})"
