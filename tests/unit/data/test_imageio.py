"""Image reading rules: grayscale, RGBA, 16-bit, EXIF orientation, downscaling, broken files, masks."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from _builders import write_image, write_mask
from fewshot_core.data import imageio
from fewshot_core.data.imageio import image_size, load_mask, load_rgb, verify_image
from fewshot_core.errors import FsadError


def _png16_rgb(path, arr: np.ndarray):
    """Hand-written 48-bit RGB PNG (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_grayscale_is_replicated(tmp_path):
    p = write_image(tmp_path / "g.png", (20, 10), "L", seed=1)
    rgb = np.asarray(load_rgb(p))
    gray = np.asarray(Image.open(p))
    assert rgb.shape == (10, 20, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)


def test_rgba_composited_on_black(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., :3] = 200
    arr[0, :, 3] = 0  # fully transparent row: hidden colour must not leak
    arr[1, :, 3] = 255
    arr[2:, :, 3] = 128
    p = tmp_path / "a.png"
    Image.fromarray(arr, "RGBA").save(p)
    rgb = np.asarray(load_rgb(p)).astype(int)
    assert imageio.ALPHA_RULE == "composite-on-black"
    assert (rgb[0] == 0).all()
    assert (rgb[1] == 200).all()
    assert (np.abs(rgb[2:] - 100) <= 1).all()


def test_sixteen_bit_gray_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 100, 65535, 32896]], np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode in ("I;16", "I")  # really a 16-bit file
    rgb = np.asarray(load_rgb(p))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 100, 255, 128])
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_sixteen_bit_rgb(tmp_path):
    arr = np.zeros((2, 3, 3), np.uint16)
    arr[0, 0] = (65535, 0, 257 * 50)
    p = tmp_path / "rgb16.png"
    _png16_rgb(p, arr)
    rgb = np.asarray(load_rgb(p))
    assert rgb.shape == (2, 3, 3)
    np.testing.assert_array_equal(rgb[0, 0], [255, 0, 50])


def _exif_jpeg(path, orientation: int, size=(40, 20)):
    """Left half red, right half blue as stored; the tag says how to display it."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = (255, 0, 0)
    arr[:, size[0] // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_exif_orientation_honoured(tmp_path):
    p = _exif_jpeg(tmp_path / "rot.jpg", 6)  # 6: rotate 90 deg clockwise to display
    img = load_rgb(p)
    assert img.size == (20, 40)
    assert image_size(p) == (20, 40) == verify_image(p)
    arr = np.asarray(img).astype(int)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60  # stored left (red) is now on top
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60
    assert load_rgb(_exif_jpeg(tmp_path / "up.jpg", 1)).size == (40, 20)


def test_exif_in_png_header(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    p = tmp_path / "rot.png"
    Image.new("RGB", (30, 10)).save(p, exif=exif.tobytes())
    assert image_size(p) == (10, 30)
    assert load_rgb(p).size == (10, 30)


def test_large_jpeg_decoded_reduced_once(tmp_path, monkeypatch):
    p = write_image(tmp_path / "big.jpg", (2000, 1000), "RGB", seed=2, quality=80)
    seen = []
    resize = Image.Image.resize

    def spy(self, size, *a, **k):
        seen.append(self.size)
        return resize(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    img = load_rgb(p, max_side=300)
    assert img.size == (300, 150) and img.mode == "RGB"
    assert seen == [(500, 250)]  # DCT-scaled decode (1/4), one resample, never the full 2000 px


def test_large_png_downscaled_keeps_aspect(tmp_path):
    p = write_image(tmp_path / "big.png", (600, 200), "RGB", seed=3)
    assert load_rgb(p, max_side=150).size == (150, 50)
    assert load_rgb(p, max_side=1000).size == (600, 200)  # never upscaled


def test_broken_files_raise_fsad_error_naming_file(tmp_path):
    good = write_image(tmp_path / "ok.png", 64, seed=4)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    for path, words in [(trunc, "cannot read"), (empty, "0 bytes"), (junk, "cannot read"), (tmp_path / "no.png", "not found")]:
        with pytest.raises(FsadError) as exc:
            load_rgb(path)
        msg = str(exc.value)
        assert str(path) in msg and words in msg and "\n" not in msg
    with pytest.raises(FsadError, match="trunc.png"):
        verify_image(trunc)
    assert image_size(trunc) == (64, 64)  # header still readable: sizes never decode pixels


def test_mask_binary_and_nearest_resize(tmp_path):
    p = write_mask(tmp_path / "m.png", (8, 4), box=(0, 0, 4, 4))
    m = load_mask(p)
    assert m.dtype == bool and m.shape == (4, 8) and m.sum() == 16
    r = load_mask(p, size=(16, 8))
    assert r.shape == (8, 16) and r[:, :8].all() and not r[:, 8:].any()
    assert load_mask(p, size=2).shape == (2, 2)
    ones = tmp_path / "ones.png"
    Image.fromarray(np.eye(3, dtype=np.uint8)).save(ones)  # 0/1 masks count too
    assert load_mask(ones).sum() == 3
    with pytest.raises(FsadError, match="missing.png"):
        load_mask(tmp_path / "missing.png")


@pytest.mark.timeout(60)
def test_every_reader_refuses_a_fifo_instead_of_waiting_for_a_writer(tmp_path):
    import os

    from fewshot_core.data.imageio import special_file_kind

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert special_file_kind(fifo) == "FIFO" and special_file_kind(tmp_path) == "folder"
    for read in (load_rgb, verify_image, image_size, load_mask):
        with pytest.raises(FsadError, match=r"pipe.png: not a regular file \(a FIFO"):
            read(fifo)
