"""Download of the official MVTec AD archive: resumable, checksum-verified, safely extracted, atomic.

Only the whole-set archive has a published checksum (anomalib's MVTec datamodule, ``DOWNLOAD_INFO``);
MVTec's per-category archives exist but no checksum for them is published, so by default a request for
some categories downloads the whole verified archive once (kept under ``<root>/.downloads`` for later
requests) and extracts only those categories. A per-category entry in ``archives`` (name -> Archive)
is used instead when given, e.g. for an internal mirror with its own checksums.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fewshot_core.checksums import sha256_file
from fewshot_core.data.mvtec import scan_category
from fewshot_core.errors import FsadError
from fewshot_core.outputs import is_write_error, require_writable, write_error

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip

ALL = "all"  # key of the whole-set archive in an archive table
DOWNLOAD_DIR = ".downloads"
WRAPPER = "mvtec_anomaly_detection"  # some repackaged archives nest the categories in this folder
BASE_URL_ENV = "FSAD_MVTEC_BASE_URL"
MANUAL_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """One downloadable archive: mirror URLs tried in order, its sha256, and the categories it holds."""

    urls: tuple[str, ...]
    sha256: str
    filename: str
    categories: tuple[str, ...] = MVTEC_CATEGORIES


# MVTec rotates its share links (older ones 404); the file and its sha256 stay the same.
# First: the link anomalib's main branch uses (2026); then the one anomalib 2.2 shipped.
DEFAULT_ARCHIVES: dict[str, Archive] = {
    ALL: Archive(
        urls=(
            "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/"
            "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz",
            "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f283/"
            "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz",
            "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/"
            "download/420938113-1629952094/mvtec_anomaly_detection.tar.xz",
        ),
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        filename="mvtec_anomaly_detection.tar.xz",
    )
}


def is_present(root: Path, category: str) -> bool:
    """A category counts as downloaded once its ``train/good`` folder exists (moved in atomically)."""
    return (Path(root) / category / "train" / "good").is_dir()


def download_mvtec(
    root,
    categories: Iterable[str] | None = None,
    *,
    base_url: str | None = None,
    progress: bool = True,
    archives: Mapping[str, Archive] | None = None,
    retries: int = 3,
    keep_archive: bool | None = None,
    timeout: float = 60.0,
) -> list[Path]:
    """Download MVTec AD into ``root`` (whole set, or only ``categories``); return the category folders.

    Categories already present are skipped, so re-runs are cheap. ``base_url`` (default: the
    ``FSAD_MVTEC_BASE_URL`` environment variable) replaces the mirror: ``<base_url>/<archive filename>``.
    ``archives`` overrides the URL/checksum table (see ``DEFAULT_ARCHIVES``). A broken transfer is
    resumed with HTTP Range, giving up after ``retries`` breaks in a row without progress; the partial
    ``.part`` file is kept, so a later run resumes too. ``keep_archive=None`` deletes the
    verified archive once every category it holds is extracted.
    """
    root = Path(root)
    if isinstance(categories, str):
        categories = [categories]
    base_url = base_url or os.environ.get(BASE_URL_ENV) or None
    table = dict(DEFAULT_ARCHIVES if archives is None else archives)
    known = _known_categories(table)
    wanted = list(known) if categories is None else list(dict.fromkeys(categories))
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise FsadError(
            f"{root}: unknown MVTec AD category {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    _check_existing(root, wanted)
    missing = [c for c in wanted if not is_present(root, c)]
    if missing:
        require_writable(root, "pass a writable ROOT (the archive and the categories go there)")

    # Per-category archives where the table has them, the whole-set archive for the rest.
    plan: dict[str, list[str]] = {}
    for cat in missing:
        key = cat if cat in table else ALL
        if key not in table:
            raise FsadError(f"{root}: no archive for category {cat}; add '{cat}' or '{ALL}' to the archive table")
        plan.setdefault(key, []).append(cat)

    for key, cats in plan.items():
        archive = table[key]
        urls = archive.urls if base_url is None else (f"{base_url.rstrip('/')}/{archive.filename}",)
        path = root / DOWNLOAD_DIR / archive.filename
        fetch(urls, path, archive.sha256, progress=progress, retries=retries, timeout=timeout)
        extract_categories(path, root, cats)
        done = keep_archive is False or (
            keep_archive is None and all(is_present(root, c) for c in archive.categories)
        )
        if done:
            path.unlink(missing_ok=True)
    downloads = root / DOWNLOAD_DIR
    if downloads.is_dir() and not any(downloads.iterdir()):
        downloads.rmdir()
    return [root / c for c in wanted]


def _known_categories(table: Mapping[str, Archive]) -> tuple[str, ...]:
    cats: list[str] = []
    for key, archive in table.items():
        cats.extend(archive.categories if key == ALL else (key,))
    return tuple(dict.fromkeys(cats))


def _check_existing(root: Path, categories: Sequence[str]) -> None:
    for cat in categories:
        folder = root / cat
        if folder.exists() and not is_present(root, cat):
            raise FsadError(
                f"{folder}: exists but has no train/good (not an MVTec category folder); "
                "move it away or delete it, then re-run the download"
            )


# --------------------------------------------------------------------------------------------------
# Transfer


def fetch(
    urls: Sequence[str],
    dest: Path,
    sha256: str,
    *,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Download ``dest`` from the first URL that answers; resume ``dest.part``; verify before renaming.

    A verified ``dest`` that already exists is reused. A checksum mismatch deletes the download and
    raises FsadError (the next run starts from zero).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if sha256_file(dest) == sha256:
            return dest
        dest.unlink()  # stale or corrupt earlier download: fetch again
    part = dest.with_name(dest.name + ".part")
    errors: list[str] = []
    for url in urls:
        try:
            _transfer(url, part, progress=progress, retries=retries, timeout=timeout)
            break
        except _MirrorError as exc:  # this mirror is gone; try the next one
            errors.append(str(exc))
    else:
        raise FsadError(
            f"{dest}: download failed ({'; '.join(errors)}); check the network, set {BASE_URL_ENV} to a mirror "
            f"folder holding {dest.name}, or download it by hand from {MANUAL_URL} "
            f"and extract it into {dest.parent.parent}"
        )
    digest = sha256_file(part)
    if digest != sha256:
        part.unlink()
        raise FsadError(
            f"{dest}: sha256 mismatch (got {digest}, expected {sha256}); the partial file was deleted, "
            f"re-run the download (if it persists, the mirror serves a different file: set {BASE_URL_ENV})"
        )
    os.replace(part, dest)
    return dest


class _MirrorError(Exception):
    """This URL cannot serve the file (HTTP error, unreachable host): try the next mirror."""


class _Interrupted(Exception):
    """The transfer broke off after some bytes: resume with Range."""


def _transfer(url: str, part: Path, *, progress: bool, retries: int, timeout: float) -> None:
    attempts, size = 0, -1
    while True:
        try:
            _transfer_once(url, part, progress=progress, timeout=timeout)
            return
        except _Interrupted as exc:
            now = part.stat().st_size if part.exists() else 0
            attempts = 1 if now > size else attempts + 1  # a break after progress starts the count anew
            size = now
            if attempts > retries:
                raise FsadError(
                    f"{part}: transfer interrupted after {size} bytes ({exc}); "
                    "re-run the same command to resume from there"
                ) from None


def _transfer_once(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "fsad-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Range past the end: the .part holds the whole file already; the checksum decides.
            return
        raise _MirrorError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _MirrorError(f"{url}: {getattr(exc, 'reason', exc)}") from None

    with response:
        if offset and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != offset:  # answered another range than asked: drop the part, start over
                part.unlink()
                raise _Interrupted(f"server answered range start {start}, asked {offset}")
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # 200: the server ignored Range and sends everything
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        bar = _progress_bar(progress, part.name, offset, None if expected is None else offset + expected)
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        block = response.read(_CHUNK)
                    except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as exc:
                        raise _Interrupted(type(exc).__name__) from None
                    if not block:
                        break
                    f.write(block)
                    received += len(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
        if expected is not None and received < expected:
            raise _Interrupted(f"got {received} of {expected} bytes")


def _content_range_start(value: str) -> int | None:
    # "bytes 100-199/200"
    try:
        unit, rest = value.split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def _progress_bar(enabled: bool, name: str, initial: int, total: int | None):
    if not enabled:
        return None
    from tqdm import tqdm  # only for a terminal download (fsad data --help imports this module)

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name)


# --------------------------------------------------------------------------------------------------
# Extraction


def check_member(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """Reject members that could write outside the target or create links/devices; return the clean path."""
    name = member.name
    where = f"{archive}: member {name!r}"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise FsadError(f"{where} has an absolute path; refusing the archive (delete it and re-download)")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        raise FsadError(f"{where} points outside the target ('..'); refusing the archive (delete it and re-download)")
    if member.issym() or member.islnk():
        raise FsadError(f"{where} is a link; refusing the archive (delete it and re-download)")
    if not (member.isfile() or member.isdir()):
        raise FsadError(f"{where} is a device/fifo/special file; refusing the archive (delete it and re-download)")
    clean = [p for p in parts if p not in ("", ".")]
    return PurePosixPath(*clean) if clean else PurePosixPath(".")


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Notes whether the member headers ended with tar's end-of-archive marker (a zero block).

    ``tarfile`` stops iterating silently at an empty, cut or garbage header past the first member, so
    an archive cut inside a member header would otherwise read as complete."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.fsad_end_marker = True
            raise


def _incomplete(tmp: Path, category: str) -> str | None:
    """Why an extracted category is not a whole MVTec category (None if it is)."""
    if not (tmp / category / "train" / "good").is_dir():
        return f"{category}/ has no train/good"
    problems = scan_category(tmp, category).problems
    if problems:
        return problems[0].replace(f"{tmp}/", "")
    return None


def extract_categories(archive: Path, root: Path, categories: Iterable[str]) -> list[Path]:
    """Extract ``categories`` (top-level folders) and root-level files of ``archive`` into ``root``.

    Members are checked one by one while streaming (one pass over the compressed file) into a temporary
    folder beside ``root``. Only when the whole archive was read to its end-of-archive marker and every
    wanted category is complete (its folder structure scans without a problem: no defect image without
    its mask, no empty split) are the categories moved into place, each with one ``os.replace``. Any
    rejected member, a cut or damaged archive, or an incomplete category aborts before anything is moved
    and removes the temporary folder. Already-present categories are left untouched.
    """
    archive, root = Path(archive), Path(root)
    wanted = {c for c in categories if not is_present(root, c)}
    if not wanted:
        return []
    root.mkdir(parents=True, exist_ok=True)
    for cat in sorted(wanted):  # checked before extracting: os.replace cannot put a folder over these
        if (root / cat).exists() or (root / cat).is_symlink():
            raise FsadError(f"{root / cat}: exists but is not a complete category (no train/good); move it "
                            "away or delete it, then re-run")
    refuse = "refusing the archive (delete it and re-download)"
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        found: set[str] = set()
        try:
            with tarfile.open(archive, "r|*", tarinfo=_EndCheckingTarInfo) as tar:
                tar.fsad_end_marker = False
                for member in tar:
                    path = check_member(member, archive)
                    if len(path.parts) > 1 and path.parts[0] == WRAPPER:
                        path = PurePosixPath(*path.parts[1:])  # tolerate a wrapper folder
                        member.name = str(path)
                    top = path.parts[0] if path.parts else "."
                    is_root_file = len(path.parts) == 1 and member.isfile()
                    if is_root_file and (top in wanted or top in MVTEC_CATEGORIES):
                        raise FsadError(f"{archive}: member {top!r} is a file where a category folder belongs; {refuse}")
                    if top not in wanted and not is_root_file:
                        continue  # another category: streamed past, never written
                    if not is_root_file:
                        found.add(top)
                    try:
                        tar.extract(member, tmp, filter="data")
                    except tarfile.FilterError as exc:
                        raise FsadError(f"{archive}: {exc}; {refuse}") from None
                ended = tar.fsad_end_marker
        except (tarfile.TarError, EOFError, OSError) as exc:
            if is_write_error(exc):
                raise write_error(exc, root, "free space in ROOT or pass another ROOT") from None
            raise FsadError(f"{archive}: cannot read the archive ({exc}); delete it and re-download") from None
        if not ended:
            raise FsadError(f"{archive}: ends before tar's end-of-archive marker (cut or damaged, e.g. inside a member "
                            "header); delete it and re-download")
        absent = sorted(c for c in wanted if c not in found)
        if absent:
            raise FsadError(f"{archive}: holds no folder {', '.join(absent)}; check the category names or the archive")
        for cat in sorted(found):  # every category verified before the first one moves
            if (why := _incomplete(tmp, cat)) is not None:
                raise FsadError(f"{archive}: category {cat} is incomplete ({why}); not an intact MVTec AD archive, "
                                "delete it and re-download")
        moved = []
        for entry in sorted(tmp.iterdir()):
            target = root / entry.name
            if entry.is_dir():
                os.replace(entry, target)  # atomic per category
                moved.append(target)
            elif not target.exists():  # licence/readme beside the categories
                os.replace(entry, target)
        return moved
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
