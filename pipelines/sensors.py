"""Sensor: new or changed images in the dataset folder request the affected embeddings partitions.

The cursor holds a fingerprint per category folder: a hash over every image file the reader takes (its
extensions, ``IMAGE_EXTENSIONS``) with its path, size, mtime_ns, ctime_ns and inode, so an added ``.webp``,
a file replaced by one of the same size with its timestamp restored (``cp -p``, ``touch -d``: the ctime
or the inode still moves) or a renamed file all count as changes. A category folder that appears is
registered as a new dynamic partition; a changed one re-requests its embeddings partitions (every
configured backbone). The feature store keys partitions by the images' content, so changed data gets new
features while unchanged categories stay cached.
"""


import hashlib
import json
import os
from pathlib import Path

import dagster as dg

from fewshot_core.data.imageio import IMAGE_EXTENSIONS
from pipelines.assets.data import layouts, resolve_data
from pipelines.config import SweepConfig
from pipelines.partitions import CATEGORY


def folder_fingerprint(folder: Path) -> str:
    """``<image count>:<16 hex digits>`` over the images under ``folder`` (see the module docstring)."""
    digest, count = hashlib.sha256(), 0
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            st = os.stat(p)
        except OSError:  # removed while listing: the next evaluation sees the folder without it
            continue
        count += 1
        digest.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n"
                      .encode())
    return f"{count}:{digest.hexdigest()[:16]}"


def layout_folders(layout) -> list[Path]:
    """The folders a ``LayoutConfig`` reads images from (absent optional ones left out)."""
    folders = [layout.good_dir, layout.test_good_dir, *layout.defect_dirs.values(), layout.mask_dir]
    return [Path(f) for f in folders if f is not None and Path(f).is_dir()]


def build_new_images_sensor(cfg: SweepConfig, embeddings_job) -> dg.SensorDefinition:
    @dg.sensor(job=embeddings_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
               description="Watches the dataset folder; new or changed images request the affected embeddings "
                           "partitions, new category folders become new partitions.")
    def new_images_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        root, source = resolve_data(cfg)
        if not root.is_dir():
            return dg.SkipReason(f"{root}: dataset folder not there yet")
        previous = json.loads(context.cursor) if context.cursor else {}
        if source == "layout":  # users' own folders: fingerprint every folder a layout names

            current = {name: ";".join(folder_fingerprint(d) for d in layout_folders(lc))
                       for name, lc in layouts(cfg).items()}
        else:
            current = {c.name: folder_fingerprint(c) for c in sorted(root.iterdir())
                       if (c / "train" / "good").is_dir() and (not cfg.categories or c.name in cfg.categories)}
        known = set(context.instance.get_dynamic_partitions(CATEGORY.name))
        new = [c for c in current if c not in known]
        changed = [c for c, fp in current.items() if c in known and previous.get(c) not in (None, fp)]
        requests = [dg.RunRequest(run_key=f"{c}:{current[c]}:{b}",
                                  partition_key=dg.MultiPartitionKey({"backbone": b, "category": c}))
                    for c in new + changed for b in cfg.backbones]
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[CATEGORY.build_add_request(new)] if new else [],
            cursor=json.dumps(current, sort_keys=True),
        )

    return new_images_sensor
