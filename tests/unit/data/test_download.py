"""MVTec AD download against a local HTTP server serving archives the tests build (no internet)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_core.data.download import ALL, Archive, download_mvtec, extract_categories, fetch
from fewshot_core.errors import FsadError

CATS = ("bottle", "cable")


def _png(rng: np.random.Generator, size: int = 48, mask: bool = False) -> bytes:
    if mask:
        arr = np.zeros((size, size), np.uint8)
        arr[10:20, 10:20] = 255
    else:  # noise so the archive does not compress to almost nothing
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _layout_files(prefix: str = "") -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {f"{prefix}license.txt": b"test licence\n"}
    for cat in CATS:
        for i in range(3):
            files[f"{prefix}{cat}/train/good/{i:03d}.png"] = _png(rng)
        files[f"{prefix}{cat}/test/good/000.png"] = _png(rng)
        files[f"{prefix}{cat}/test/crack/000.png"] = _png(rng)
        files[f"{prefix}{cat}/ground_truth/crack/000_mask.png"] = _png(rng, mask=True)
    return files


def _tar(files: dict[str, bytes], mode: str = "w:xz", extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name in sorted({str(Path(n).parent) for n in files if "/" in n}):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files``; supports ``Range: bytes=N-``; can cut the first response short."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 (http.server API)
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cuts:  # simulate a dropped connection after this many bytes
            cut = srv.cuts.pop(0)
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(autouse=True)
def _no_mirror_from_the_environment(monkeypatch):
    monkeypatch.delenv("FSAD_MVTEC_BASE_URL", raising=False)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.log, srv.cuts, srv.ignore_range = {}, [], [], False
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _serve(server, data: bytes, name: str = "mvtec.tar.xz", sha: str | None = None) -> dict[str, Archive]:
    server.files[f"/{name}"] = data
    return {ALL: Archive(urls=(f"{server.url}/{name}",), sha256=sha or _sha(data), filename=name, categories=CATS)}


def _assert_extracted(root: Path, files: dict[str, bytes], cats=CATS):
    for name, data in files.items():
        if name.split("/")[0] in cats or "/" not in name:
            assert (root / name).read_bytes() == data, name


def test_whole_set_download_verifies_extracts_and_is_idempotent(server, tmp_path):
    files = _layout_files()
    table = _serve(server, _tar(files))
    root = tmp_path / "mvtec"
    out = download_mvtec(root, archives=table, progress=True)
    assert out == [root / c for c in CATS]
    _assert_extracted(root, files)
    # every category extracted -> the archive is removed, no temp folders left
    assert sorted(p.name for p in root.iterdir()) == ["bottle", "cable", "license.txt"]
    n_requests = len(server.log)
    assert download_mvtec(root, archives=table, progress=False) == out
    assert len(server.log) == n_requests  # already present: nothing fetched


def test_category_download_keeps_verified_archive_for_the_next_category(server, tmp_path):
    files = _layout_files()
    table = _serve(server, _tar(files, mode="w:gz"), name="mvtec.tar.gz")
    root = tmp_path / "mvtec"
    assert download_mvtec(root, ["cable"], archives=table, progress=False) == [root / "cable"]
    assert not (root / "bottle").exists()
    _assert_extracted(root, files, cats=("cable",))
    assert (root / ".downloads" / "mvtec.tar.gz").is_file()
    download_mvtec(root, ["bottle"], archives=table, progress=False)
    assert len(server.log) == 1  # second category came from the kept, re-verified archive
    _assert_extracted(root, files)
    assert not (root / ".downloads").exists()


def test_base_url_replaces_the_mirror_and_wrapper_folder_is_tolerated(server, tmp_path):
    files = _layout_files(prefix="mvtec_anomaly_detection/")
    data = _tar(files)
    server.files["/mirror/mvtec.tar.xz"] = data
    table = {ALL: Archive(urls=("http://127.0.0.1:9/nowhere",), sha256=_sha(data), filename="mvtec.tar.xz",
                          categories=CATS)}
    root = tmp_path / "mvtec"
    download_mvtec(root, ["bottle"], archives=table, base_url=server.url + "/mirror/", progress=False)
    assert server.log == [("/mirror/mvtec.tar.xz", None)]
    assert (root / "bottle" / "train" / "good" / "000.png").read_bytes() == files[
        "mvtec_anomaly_detection/bottle/train/good/000.png"
    ]


def test_dead_mirror_falls_back_to_the_next_url(server, tmp_path):
    data = _tar(_layout_files())
    server.files["/ok.tar.xz"] = data
    urls = (f"{server.url}/gone.tar.xz", f"{server.url}/ok.tar.xz")
    table = {ALL: Archive(urls=urls, sha256=_sha(data), filename="m.tar.xz", categories=CATS)}
    download_mvtec(tmp_path, archives=table, progress=False)
    assert [p for p, _ in server.log] == ["/gone.tar.xz", "/ok.tar.xz"]
    assert (tmp_path / "cable" / "test" / "crack" / "000.png").is_file()


def test_interrupted_transfer_is_resumed_with_range(server, tmp_path):
    data = _tar(_layout_files())
    table = _serve(server, data)
    cut = len(data) // 3
    server.cuts = [cut]
    download_mvtec(tmp_path, archives=table, progress=False)
    assert server.log == [("/mvtec.tar.xz", None), ("/mvtec.tar.xz", f"bytes={cut}-")]
    assert (tmp_path / "bottle" / "train" / "good" / "002.png").is_file()


def test_repeated_breaks_with_progress_keep_resuming(server, tmp_path):
    data = _tar(_layout_files())
    server.files["/f.tar.xz"] = data
    server.cuts = [1000, 1000, 1000, 1000]  # four breaks, each after some progress
    dest = tmp_path / "f.tar.xz"
    fetch([f"{server.url}/f.tar.xz"], dest, _sha(data), progress=False, retries=1)
    assert [r for _, r in server.log] == [None, "bytes=1000-", "bytes=2000-", "bytes=3000-", "bytes=4000-"]
    assert dest.read_bytes() == data


def test_interrupted_transfer_is_resumed_by_the_next_run(server, tmp_path):
    data = _tar(_layout_files())
    table = _serve(server, data)
    cut = len(data) // 2
    server.cuts = [cut]
    with pytest.raises(FsadError, match="re-run the same command to resume"):
        download_mvtec(tmp_path, archives=table, progress=False, retries=0)
    part = tmp_path / ".downloads" / "mvtec.tar.xz.part"
    assert part.stat().st_size == cut
    assert not (tmp_path / "bottle").exists()
    download_mvtec(tmp_path, archives=table, progress=False, retries=0)
    assert server.log[-1] == ("/mvtec.tar.xz", f"bytes={cut}-")
    assert (tmp_path / "bottle" / "train" / "good").is_dir()


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    data = _tar(_layout_files())
    dest = tmp_path / "a.tar.xz"
    server.files["/a.tar.xz"] = data
    server.ignore_range = True
    server.cuts = [len(data) // 4]
    fetch([f"{server.url}/a.tar.xz"], dest, _sha(data), progress=False)
    assert server.log[1][1] is not None  # asked for a range, got a 200 with everything
    assert dest.read_bytes() == data


def test_complete_part_file_answered_416_is_verified(server, tmp_path):
    data = b"x" * 1000
    server.files["/f.bin"] = data
    dest = tmp_path / "f.bin"
    Path(str(dest) + ".part").write_bytes(data)
    fetch([f"{server.url}/f.bin"], dest, _sha(data), progress=False)
    assert dest.read_bytes() == data and server.log == [("/f.bin", "bytes=1000-")]


def test_checksum_mismatch_deletes_the_download(server, tmp_path):
    table = _serve(server, _tar(_layout_files()), sha="0" * 64)
    with pytest.raises(FsadError, match="sha256 mismatch"):
        download_mvtec(tmp_path, archives=table, progress=False)
    assert not list((tmp_path / ".downloads").glob("*"))
    assert not (tmp_path / "bottle").exists()


def test_http_error_is_a_clear_fsad_error(server, tmp_path):
    table = {ALL: Archive(urls=(f"{server.url}/missing.tar.xz",), sha256="0" * 64, filename="m.tar.xz",
                          categories=CATS)}
    with pytest.raises(FsadError, match="HTTP 404.*FSAD_MVTEC_BASE_URL"):
        download_mvtec(tmp_path, archives=table, progress=False)


def test_mirror_from_the_environment_and_single_category_string(server, tmp_path, monkeypatch):
    data = _tar(_layout_files())
    server.files["/env/m.tar.xz"] = data
    table = {ALL: Archive(urls=("http://127.0.0.1:9/dead",), sha256=_sha(data), filename="m.tar.xz", categories=CATS)}
    monkeypatch.setenv("FSAD_MVTEC_BASE_URL", f"{server.url}/env")
    assert download_mvtec(tmp_path, "cable", archives=table, progress=False) == [tmp_path / "cable"]
    assert server.log == [("/env/m.tar.xz", None)]


def _member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda out: (_member("../evil", tarfile.REGTYPE), b"pwned"), r"outside the target"),
        (lambda out: (_member("bottle/../../evil", tarfile.REGTYPE), b"pwned"), r"outside the target"),
        (lambda out: (_member(str(out / "evil"), tarfile.REGTYPE), b"pwned"), r"absolute path"),
        (lambda out: (_member("bottle/evil", tarfile.SYMTYPE, str(out / "evil")), None), r"is a link"),
        (lambda out: (_member("bottle/evil", tarfile.LNKTYPE, "bottle/train/good/000.png"), None), r"is a link"),
        (lambda out: (_member("bottle/evil", tarfile.CHRTYPE), None), r"device"),
        (lambda out: (_member("bottle/evil", tarfile.FIFOTYPE), None), r"device"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "chardev", "fifo"],
)
def test_malicious_member_rejects_the_archive_and_writes_nothing(server, tmp_path, make, match):
    outside = tmp_path / "outside"
    outside.mkdir()
    info, payload = make(outside)
    if payload is not None:
        info.size = len(payload)
    table = _serve(server, _tar(_layout_files(), extra=[(info, payload)]))
    root = tmp_path / "data" / "mvtec"
    with pytest.raises(FsadError, match=match):
        download_mvtec(root, archives=table, progress=False)
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "data" / "evil").exists() and not (root / "evil").exists()
    # nothing moved into place, no temporary folder left behind
    assert sorted(p.name for p in root.iterdir()) == [".downloads"]


def test_extract_rejects_a_non_mvtec_archive(tmp_path):
    archive = tmp_path / "x.tar.gz"
    archive.write_bytes(_tar({"bottle/readme.txt": b"hi"}, mode="w:gz"))
    with pytest.raises(FsadError, match="no train/good"):
        extract_categories(archive, tmp_path / "out", ["bottle"])
    with pytest.raises(FsadError, match="holds no folder cable"):
        extract_categories(archive, tmp_path / "out", ["cable"])


def test_corrupt_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "x.tar.xz"
    archive.write_bytes(b"not a tar at all")
    with pytest.raises(FsadError, match="cannot read the archive"):
        extract_categories(archive, tmp_path / "out", ["bottle"])


def test_bad_requests_are_clear_errors(tmp_path):
    with pytest.raises(FsadError, match="unknown MVTec AD category botle"):
        download_mvtec(tmp_path, ["botle"], progress=False)
    (tmp_path / "bottle").mkdir()
    with pytest.raises(FsadError, match="no train/good"):
        download_mvtec(tmp_path, ["bottle"], progress=False)


def _tar_cut_in_header_of(files: dict[str, bytes], name: str) -> bytes:
    """An uncompressed tar of ``files`` cut 100 bytes into the header of member ``name``."""
    data = _tar(files, mode="w")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offset = tar.getmember(name).offset
    return data[:offset + 100]


def test_archive_cut_inside_a_member_header_extracts_nothing(tmp_path):
    """Before: tarfile stopped silently at the cut header; bottle, missing its mask, was moved in and
    counted as present from then on."""
    archive = tmp_path / "cut.tar"
    archive.write_bytes(_tar_cut_in_header_of(_layout_files(), "bottle/ground_truth/crack/000_mask.png"))
    out = tmp_path / "out"
    with pytest.raises(FsadError, match="end-of-archive marker.*re-download"):
        extract_categories(archive, out, ["bottle"])
    assert sorted(p.name for p in out.iterdir()) == []  # nothing moved, no temporary left


def test_archive_cut_in_another_categorys_header_is_still_refused(tmp_path):
    archive = tmp_path / "cut.tar"
    archive.write_bytes(_tar_cut_in_header_of(_layout_files(), "cable/test/good/000.png"))
    with pytest.raises(FsadError, match="end-of-archive marker"):
        extract_categories(archive, tmp_path / "out", ["bottle"])
    assert not (tmp_path / "out" / "bottle").exists()


def test_incomplete_category_in_a_whole_archive_is_refused(tmp_path):
    files = _layout_files()
    del files["bottle/ground_truth/crack/000_mask.png"]  # complete tar, incomplete category
    files["bottle/ground_truth/crack/readme.txt"] = b"the mask folder is there, the mask is not"
    archive = tmp_path / "x.tar.xz"
    archive.write_bytes(_tar(files))
    with pytest.raises(FsadError, match="category bottle is incomplete.*has no mask"):
        extract_categories(archive, tmp_path / "out", ["bottle", "cable"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # cable, intact, not moved either


def test_root_level_file_named_like_a_category_is_refused(tmp_path):
    """Before: the file ``bottle`` counted as the category folder, was moved in, and the download 'succeeded'."""
    files = {k: v for k, v in _layout_files().items() if not k.startswith("bottle/")}
    files["bottle"] = b"not a folder"
    archive = tmp_path / "x.tar.xz"
    archive.write_bytes(_tar(files))
    with pytest.raises(FsadError, match="member 'bottle' is a file where a category folder belongs"):
        extract_categories(archive, tmp_path / "out", ["bottle"])
    assert not (tmp_path / "out" / "bottle").exists()


def test_no_category_moves_unless_all_are_complete(tmp_path):
    files = _layout_files()
    files = {k: v for k, v in files.items() if not k.startswith("cable/train/")}
    archive = tmp_path / "x.tar.xz"
    archive.write_bytes(_tar(files))
    with pytest.raises(FsadError, match="category cable is incomplete.*no train/good"):
        extract_categories(archive, tmp_path / "out", ["bottle", "cable"])
    assert not (tmp_path / "out" / "bottle").exists()  # before: bottle was moved in, then cable failed
