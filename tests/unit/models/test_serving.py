"""A served model reads only what the request carries, within pixel budgets, and answers bad requests with a
400 of one line and unreadable rows with JSON null (``fewshot_core/models/serving.py``).

Requests go through MLflow's scoring-server handler (``scoring_server.invocations``, what ``POST
/invocations`` calls) on a model loaded by ``mlflow.pyfunc.load_model``, in this process."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import pytest

MiB = 1 << 20


@pytest.fixture(scope="module")
def served(logged_model, tmp_path_factory):
    import mlflow.pyfunc

    from fewshot_core.models.trust import download_verified

    model_dir = download_verified(logged_model.model_uri, tmp_path_factory.mktemp("served"), logged_model.tracking_uri)
    return mlflow.pyfunc.load_model(str(model_dir))


def _post(model, columns: list[str], rows: list[list]):
    """(HTTP status, body) as the scoring server answers a JSON ``dataframe_split`` request."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    body = json.dumps({"dataframe_split": {"columns": columns, "data": rows}})
    try:
        answer = scoring_server.invocations(body, "application/json", model, model.metadata.get_input_schema())
    except MlflowException as exc:  # the app turns these into the response below
        return exc.get_http_status_code(), exc.serialize_as_json()
    return answer.status, answer.response


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in the answer: not valid JSON")

    return json.loads(text, parse_constant=refuse)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _huge_png(path: Path, side: int = 12000) -> Path:
    """An 8-bit gray PNG of side x side black pixels, written row by row: small on disk, never held in memory."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def decoded_sizes(monkeypatch):
    """The (width, height) of every image PIL decodes during the test (``load`` with pixels still to read)."""
    from PIL import ImageFile

    sizes: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self):
        if self.tile:
            sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes


@pytest.mark.slow
def test_path_column_is_refused_and_no_server_file_is_scored(served, logged_model):
    from fewshot_core.models.serving import InvalidRequest

    server_file = str(logged_model.query_paths[0])  # an image on the server's disk
    status, body = _post(served, ["path"], [[server_file], ["/etc/passwd"]])
    message = _strict_json(body)["message"]
    assert status == 400 and "\n" not in message and "'path'" in message and "image" in message
    assert server_file not in message and "stack_trace" not in _strict_json(body)
    # the model itself refuses the column, whatever schema a caller got past
    with pytest.raises(InvalidRequest, match="column 'path' is refused"):
        served.unwrap_python_model().predict(None, __import__("pandas").DataFrame({"path": [server_file]}))


@pytest.mark.slow
def test_request_without_an_image_column_is_a_400_with_one_line(served):
    status, body = _post(served, ["picture"], [["x"]])
    answer = _strict_json(body)
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert answer["message"].startswith("model input: no column 'image'") and "\n" not in answer["message"]
    assert "stack_trace" not in answer and "Traceback" not in body


@pytest.mark.slow
def test_batch_with_an_unreadable_image_is_valid_json_with_null(served, logged_model):
    good = logged_model.query_paths[0]
    status, body = _post(served, ["image"], [[_b64(good.read_bytes())], [_b64(b"not an image")]])
    assert status == 200
    first, second = _strict_json(body)["predictions"]
    assert first["image_score"] == pytest.approx(logged_model.query_scores[0], abs=1e-4) and first["error"] is None
    assert first["decision"] == (logged_model.query_scores[0] > logged_model.threshold)
    assert second["image_score"] is None and second["decision"] is None and second["threshold"] is None
    assert second["error"].startswith("input row 1: cannot read image (not a known image format)")


@pytest.mark.slow
def test_huge_declared_png_is_refused_from_its_header_without_decoding(served, logged_model, tmp_path,
                                                                        decoded_sizes):
    huge = _huge_png(tmp_path / "huge.png")
    assert huge.stat().st_size < MiB  # 144 megapixels declared, a few hundred KB on disk
    good = logged_model.query_paths[0]
    status, body = _post(served, ["image"], [[_b64(huge.read_bytes())], [_b64(good.read_bytes())]])
    assert status == 200
    refused, scored = _strict_json(body)["predictions"]
    assert refused["image_score"] is None
    assert refused["error"].startswith("input row 0: 12000 x 12000 pixels is over the server's limit of 50 megapixels")
    assert scored["error"] is None and scored["image_score"] == pytest.approx(logged_model.query_scores[0], abs=1e-4)
    assert (12000, 12000) not in decoded_sizes and decoded_sizes, "the huge image was decoded"


@pytest.mark.slow
def test_request_pixel_budget_refuses_the_rows_past_it(served, logged_model, monkeypatch, decoded_sizes):
    from fewshot_core.models.serving import REQUEST_PIXELS_ENV

    from PIL import Image

    side = Image.open(logged_model.query_paths[0]).size
    monkeypatch.setenv(REQUEST_PIXELS_ENV, str(int(2.5 * side[0] * side[1])))
    rows = [[_b64(p.read_bytes())] for p in logged_model.query_paths[:4]]
    status, body = _post(served, ["image"], rows)
    answers = _strict_json(body)["predictions"]
    assert status == 200 and [a["error"] is None for a in answers] == [True, True, False, False]
    assert all(REQUEST_PIXELS_ENV in a["error"] and "another request" in a["error"] for a in answers[2:])
    assert len(decoded_sizes) == 2  # the refused rows were never decoded


@pytest.mark.slow
def test_large_jpeg_is_decoded_at_a_reduced_scale(served, tmp_path, decoded_sizes):
    """A 4000 x 3000 JPEG (within the budget) is decoded near 8x the model's 64 px, not at full size."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(pixels).save(path, quality=80)
    status, body = _post(served, ["image"], [[_b64(path.read_bytes())]])
    (answer,) = _strict_json(body)["predictions"]
    assert status == 200 and answer["error"] is None and answer["image_score"] is not None
    assert decoded_sizes == [(1000, 750)], decoded_sizes  # DCT scale 1/4: the smallest at least 512 px wide


def test_a_bad_budget_setting_is_one_line_naming_the_variable(monkeypatch):
    from fewshot_core.errors import FsadError
    from fewshot_core.models.serving import IMAGE_PIXELS, IMAGE_PIXELS_ENV, REQUEST_PIXELS, budgets

    assert budgets() == (IMAGE_PIXELS, REQUEST_PIXELS)
    monkeypatch.setenv(IMAGE_PIXELS_ENV, "2e6")
    assert budgets() == (2_000_000, REQUEST_PIXELS)
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv(IMAGE_PIXELS_ENV, bad)
        with pytest.raises(FsadError, match=f"^{IMAGE_PIXELS_ENV}=.*positive number of pixels"):
            budgets()
