"""Reading images and masks the same way everywhere: 3-channel RGB, EXIF-upright, bounded size.

Users' own data comes as grayscale, RGBA, 16-bit or phone JPEGs with an EXIF orientation tag; the
backbones want 8-bit RGB. The conversion rules are fixed here and recorded in the constants below so
results can say how an image was read.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_core.errors import FsadError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

# How non-RGB images become the backbone's 3 channels (recorded with features and manifests).
GRAY_RULE = "replicate"  # L / 1 / 16-bit gray: the one channel copied into R, G and B
ALPHA_RULE = "composite-on-black"  # RGBA / LA / P+transparency: rgb * alpha, so hidden pixels read as black
SIXTEEN_BIT_RULE = "round(v / 257)"  # 0..65535 -> 0..255; mode I is taken as 16-bit (PNG 16-bit gray opens as I)
FLOAT_RULE = "[0,1] if max <= 1 else [0,255], clipped"
CONVERSION_RULES = {"gray": GRAY_RULE, "alpha": ALPHA_RULE, "16bit": SIXTEEN_BIT_RULE, "float": FLOAT_RULE}

# Mask rule: any non-zero pixel is defect (MVTec masks are 0/255; 0/1 masks also work).
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


_SPECIAL = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
            (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))


def special_file_kind(path) -> str | None:
    """What ``path`` is when it is not a regular file ("FIFO", "socket", ...); None for a regular file or a
    missing one (opening it reports that). From ``os.stat`` alone: opening a FIFO would wait for a writer."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _SPECIAL if test(mode)), "special file")


def not_regular_message(path, kind: str) -> str:
    return f"{path}: not a regular file (a {kind}; reading it could wait forever); replace it with an image file or remove it"


def _require_regular(path) -> None:
    if (kind := special_file_kind(path)) is not None:
        raise FsadError(not_regular_message(path, kind))


def _fail(path: Path, exc: BaseException | None = None) -> FsadError:
    path = Path(path)
    if not path.exists():
        return FsadError(f"{path}: file not found; check the dataset folder")
    if path.is_file() and path.stat().st_size == 0:
        return FsadError(f"{path}: empty file (0 bytes); replace it with a valid image or remove it")
    reason = (str(exc).splitlines() or [type(exc).__name__])[0] if exc is not None else "unknown error"
    return FsadError(f"{path}: cannot read image ({reason}); replace it with a valid image or remove it")


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1 = upright) without decoding pixels.

    Pillow's PNG ``getexif`` decodes the whole image when the eXIf chunk sits after the pixel data;
    such files are rare, so for an undecoded PNG only an eXIf chunk seen in the header counts.
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF block: treat as upright rather than reject the image
        return 1
    return value if value in _TRANSPOSE else 1


def _oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as ``load_rgb`` returns it (EXIF-upright), read from the header only."""
    _require_regular(path)
    try:
        with Image.open(path) as img:
            return _oriented_size(img.size, _orientation(img))
    except _READ_ERRORS as exc:
        raise _fail(path, exc) from exc


def verify_image(path: Path) -> tuple[int, int]:
    """Decode every pixel (catches truncated files) and return the upright (width, height)."""
    return decode_digest(path)[0]


def decode_digest(path: Path) -> tuple[tuple[int, int], str]:
    """``verify_image``'s (width, height) and the sha256 of the decoded pixels (mode, size and raw bytes):
    the same picture re-encoded (another PNG compression, BMP, lossless WebP) has the same digest."""
    _require_regular(path)
    try:
        with Image.open(path) as img:
            orientation = _orientation(img)
            img.load()
            digest = hashlib.sha256(f"{img.mode}:{img.size}:{orientation}".encode())
            digest.update(img.tobytes())
            return _oriented_size(img.size, orientation), digest.hexdigest()
    except _READ_ERRORS as exc:
        raise _fail(path, exc) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        if mode == "F":
            top = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
            arr8 = np.clip(np.nan_to_num(arr) / top * 255.0, 0, 255).round().astype(np.uint8)
        else:  # I;16, I;16B, I;16L, I: 16-bit data
            arr8 = np.round(np.clip(arr.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1 (replicated), CMYK, YCbCr, LAB, HSV


def load_rgb(path: Path, max_side: int | None = None, data: bytes | None = None) -> Image.Image:
    """Open an image as 8-bit RGB, upright per EXIF, its longer side at most ``max_side`` pixels.

    Large JPEGs are decoded at a reduced scale (``draft``); other formats are decoded once and
    shrunk with ``reduce`` before resampling (``reducing_gap``), so no image is decoded twice.
    ``data``: the encoded file's bytes (an upload to a served model); ``path`` then only names it in errors.
    """
    path = Path(path)
    if data is None:
        _require_regular(path)
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            orientation = _orientation(img)
            scale = None
            if max_side is not None and max(img.size) > max_side:
                scale = max_side / max(img.size)
                target = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
                img.draft(None, target)  # JPEG only: DCT scaling to >= target; no-op elsewhere
            img.load()
            rgb = _to_rgb(img)
            if scale is not None and rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            if orientation != 1:
                rgb = rgb.transpose(_TRANSPOSE[orientation])
            return rgb if rgb is not img else img.copy()
    except _READ_ERRORS as exc:
        if data is not None:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise FsadError(f"{path}: cannot read image ({reason}); send a PNG, JPEG, BMP, TIFF or WebP file") from exc
        raise _fail(path, exc) from exc


def load_mask(path: Path, size: tuple[int, int] | int | None = None) -> np.ndarray:
    """Boolean defect mask [height, width]; non-zero pixels are defect.

    ``size`` is (width, height) as in PIL (an int means square); resizing is nearest-neighbour so
    the mask stays binary.
    """
    path = Path(path)
    _require_regular(path)
    try:
        with Image.open(path) as img:
            orientation = _orientation(img)
            img.load()
            if img.mode in ("RGBA", "LA", "P", "RGB"):
                img = img.convert("L")
            if size is not None:
                wh = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
                # resize in the upright frame: swap the target before transposing when rotated 90 deg
                pre = _oriented_size(wh, orientation)
                if img.size != pre:
                    img = img.resize(pre, Image.Resampling.NEAREST)
            if orientation != 1:
                img = img.transpose(_TRANSPOSE[orientation])
            return np.asarray(img) > 0
    except _READ_ERRORS as exc:
        raise _fail(path, exc) from exc
