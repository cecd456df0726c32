"""What a served fsad model reads from a request, and the limits it holds the request to.

A served model (``mlflow models serve``, or ``predict`` of ``mlflow.pyfunc.load_model``) reads only what
the request carries: column ``image``, one encoded image file per row (PNG, JPEG, BMP, TIFF, WebP; base64
in JSON). A column ``path`` would name a file on the server's disk and is refused, as is a request without
``image``: both are HTTP 400 with a one-line message. ``fsad predict`` reads the files its user names.

Each image's size is read from its header before a pixel is decoded: an image over the per-image budget,
or one that would take the request over the per-request budget, gets a row error and is never decoded
(a 445 KB PNG can declare 12000 x 12000 pixels). The others are decoded at most ``DECODE_FACTOR`` times
the model's image size on the longer side (JPEG at a reduced DCT scale), since the model resizes to its
image size anyway. The budgets are the server's to set, through the environment variables below.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image, UnidentifiedImageError

from fewshot_core.data.imageio import _READ_ERRORS, load_rgb
from fewshot_core.errors import FsadError

IMAGE_PIXELS_ENV = "FSAD_SERVE_MAX_IMAGE_PIXELS"
REQUEST_PIXELS_ENV = "FSAD_SERVE_MAX_REQUEST_PIXELS"
IMAGE_PIXELS = 50_000_000  # an 8K camera frame fits; decoding one takes about 150 MB as RGB
REQUEST_PIXELS = 200_000_000
DECODE_FACTOR = 8  # the evaluation decodes whole images: below 8x the model's size a served image is too
REQUEST_HELP = ('send each image file\'s bytes in a column "image" (base64 in JSON: {"dataframe_split": '
                '{"columns": ["image"], "data": [["<base64>"]]}})')


class InvalidRequest(MlflowException):
    """A request the model cannot take: HTTP 400 whose message is the one line.

    MLflow's scoring server rewrites ``message`` of an exception from ``predict`` to prefix the request's
    data (the whole frame, base64 and all, over several lines); this one keeps its own line."""

    def __init__(self, message: str):
        self._line = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value) -> None:  # the server's prefixed copy is dropped on purpose (see the class)
        pass


def budgets() -> tuple[int, int]:
    """(pixels per image, pixels per request) from the environment, or the defaults."""
    out = []
    for name, default in ((IMAGE_PIXELS_ENV, IMAGE_PIXELS), (REQUEST_PIXELS_ENV, REQUEST_PIXELS)):
        text = os.environ.get(name, "").strip()
        try:
            value = int(float(text)) if text else default
        except ValueError:
            value = 0
        if value <= 0:
            raise FsadError(f"{name}={text!r}: give a positive number of pixels (default {default})")
        out.append(value)
    return out[0], out[1]


def read_request(model_input, image_size: int) -> tuple[list, list]:
    """(decoded RGB images or None, one-line errors or None), one each per row of ``model_input``."""
    try:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    except (TypeError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InvalidRequest(f"model input: not a table of images ({reason}); {REQUEST_HELP}") from None
    if "path" in frame.columns:
        raise InvalidRequest("model input: column 'path' is refused: a served model reads only what the request "
                             f"carries, never the server's files; {REQUEST_HELP}")
    if "image" not in frame.columns:  # MLflow drops columns outside the signature, 'path' among them
        raise InvalidRequest("model input: no column 'image' (a served model reads only the image files the "
                             f"request carries, never a 'path' on the server); {REQUEST_HELP}")
    per_image, per_request = budgets()
    images, errors, used = [], [], 0
    for i, value in enumerate(frame["image"]):
        try:
            data = _image_bytes(value, i)
            pixels = _header_pixels(data, i, per_image)
            if used + pixels > per_request:
                raise FsadError(f"input row {i}: the request's images pass {per_request / 1e6:g} megapixels here "
                                f"(the server's {REQUEST_PIXELS_ENV}); send the rest in another request")
            used += pixels
            images.append(_decode(data, i, image_size))
            errors.append(None)
        except FsadError as exc:
            images.append(None)
            errors.append(str(exc).splitlines()[0])
    return images, errors


def _image_bytes(value, i: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):  # base64 text: a frame built by hand rather than parsed through the schema
        try:
            data = base64.b64decode(value)
        except (binascii.Error, ValueError):
            raise FsadError(f"input row {i}: column 'image' is text but not base64; send the file's bytes "
                            "base64-encoded") from None
    else:
        data = b""
    if not data:
        raise FsadError(f"input row {i}: no image in column 'image'; send the image file's bytes")
    return data


def _header_pixels(data: bytes, i: int, per_image: int) -> int:
    """Width x height from the header alone (PIL opens lazily); over ``per_image`` is a row error."""
    too_big = (f"over the server's limit of {per_image / 1e6:g} megapixels per image ({IMAGE_PIXELS_ENV}); "
               "send it scaled down, the model works at a far smaller size")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, far above the budget
        raise FsadError(f"input row {i}: {str(exc).splitlines()[0]}; {too_big}") from None
    except _READ_ERRORS as exc:
        reason = ("not a known image format" if isinstance(exc, UnidentifiedImageError)
                  else (str(exc).splitlines() or [type(exc).__name__])[0])
        raise FsadError(f"input row {i}: cannot read image ({reason}); send a PNG, JPEG, BMP, TIFF or WebP "
                        "file") from None
    if width * height > per_image:
        raise FsadError(f"input row {i}: {width} x {height} pixels is {too_big}")
    return width * height


def _decode(data: bytes, i: int, image_size: int):
    return load_rgb(Path(f"input row {i}"), max_side=DECODE_FACTOR * image_size, data=data)
