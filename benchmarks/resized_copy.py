"""Copy an MVTec-layout category at the working resolution of the image loaders (for a remote GPU box).

Images go through exactly the resize the trained detectors apply (``load_rgb`` at 2x, then bilinear to
``--size``) and masks through ``load_mask`` at ``--size`` (nearest), then are saved as lossless PNG: a
trained detector at ``image_size == --size`` and metrics at ``mask_size == --size`` read the very same
pixels from the copy as from the original (feature-store backbones resize again and may differ slightly).

    python benchmarks/resized_copy.py ../shared/data/mvtec_ad .devdata/mvtec_ad --category bottle --size 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fewshot_core.data.imageio import load_mask  # noqa: E402
from fewshot_core.methods.components.images import load_images  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--category", required=True)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args(argv)
    src = args.root / args.category
    n = 0
    for path in sorted(src.rglob("*.png")):
        rel = path.relative_to(src)
        dst = args.out / args.category / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel.parts[0] == "ground_truth":
            Image.fromarray(load_mask(path, args.size).astype(np.uint8) * 255).save(dst)
        else:
            x = load_images([path], args.size)[0].permute(1, 2, 0).numpy()
            Image.fromarray((x * 255).round().astype(np.uint8)).save(dst)
        n += 1
    print(f"{n} files -> {args.out / args.category}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
