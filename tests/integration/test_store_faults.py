"""Feature-store faults through the real ``fsad`` command in separate processes.

Damaged partition files, a full disk, a read-only store, two builders of one partition at once, and a
builder killed with SIGKILL: each ends in a one-line message or a correct rebuild, never a traceback,
a crash or a half-written partition. Full and read-only disks are small tmpfs mounts (root only;
skipped otherwise).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fewshot_core.cli import main
from fewshot_core.data.mvtec import load_category
from fewshot_core.data.synth import generate
from fewshot_core.features import FeatureStore, verify_partition
from fewshot_core.features.store import EmbedCompute, FeatureSpec
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout: subprocesses import this code

SIZE = 64


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_faults")
    (category,) = generate(root, categories=1, seed=5, size=80, n_train=6, n_test_good=2, n_test_per_defect=1)
    return root, category


def fsad(*args, home: Path, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "FSAD_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "fewshot_core", *map(str, args)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def embed_args(synth, store, size=SIZE):
    root, category = synth
    return ["embed", root, "--category", category, "--store", store, "--image-size", size, "--num-workers", "0",
            "--batch-size", "4", "--no-progress"]


def leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.name.startswith((".tmp-", ".trash-")))


def one_line_error(proc, expected: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsad: error: ") and expected in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture()
def tmpfs(tmp_path):
    """``mount(size, read_only=False) -> Path``: a private tmpfs, unmounted at the end (root only)."""
    if os.geteuid() != 0:
        pytest.skip("tmpfs mounts need root")
    mounts = []

    def mount(size: str, name: str = "mnt") -> Path:
        target = tmp_path / name
        target.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounts.append(target)
        return target

    yield mount
    for target in reversed(mounts):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def remount_read_only(target: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True, capture_output=True)


def test_damaged_partition_files_are_reported_verified_and_rebuilt(synth, tmp_path):
    store = tmp_path / "store"
    first = fsad(*embed_args(synth, store), home=tmp_path)
    assert first.returncode == 0 and first.stdout.startswith("built "), first.stderr[-2000:]
    (key,) = FeatureStore(store).keys()
    part = store / key
    pristine = np.load(part / "patch.npy")
    damages = {
        "patch.npy: truncated": lambda: os.truncate(part / "patch.npy", 4096),
        "index.parquet: missing": lambda: (part / "index.parquet").unlink(),
        "meta.json unreadable": lambda: (part / "meta.json").write_text('{"key": '),
    }
    for reason, damage in damages.items():
        damage()
        check = fsad("store", "verify", "--store", store, home=tmp_path)
        assert check.returncode == 1 and f"DAMAGED {key}: {reason}" in check.stdout, check.stdout + check.stderr
        assert "1 partitions" in check.stdout and "1 damaged" in check.stdout and "Traceback" not in check.stderr

        again = fsad(*embed_args(synth, store), home=tmp_path)
        assert again.returncode == 0 and again.stdout.startswith(f"built {key}"), again.stderr[-2000:]
        err = again.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fsad: {key}: partition damaged ({reason}"), again.stderr
        assert err[0].endswith("rebuilding it") and "Traceback" not in again.stderr
        assert np.array_equal(np.load(part / "patch.npy"), pristine) and leftovers(store) == []
    ok = fsad("store", "verify", "--store", store, home=tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok      {key}") and "0 damaged" in ok.stdout


def test_full_disk_during_embed_is_one_line_and_leaves_nothing(synth, tmp_path, tmpfs):
    disk = tmpfs("512k")  # the 128 px patch features alone need ~1 MB
    proc = fsad(*embed_args(synth, disk / "store", size=128), home=tmp_path)
    one_line_error(proc, "no space left for the feature partition")
    assert "--store DIR" in proc.stderr and proc.returncode != 135  # no SIGBUS from a memmap write
    store = disk / "store"
    assert FeatureStore(store).keys() == [] and leftovers(store) == []
    assert shutil.disk_usage(disk).used < 64 * 1024  # the preallocated arrays were removed

    big = tmpfs("64m", "big")  # the same command on a disk with room succeeds
    ok = fsad(*embed_args(synth, big / "store", size=128), home=tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("built "), ok.stderr[-2000:]


def test_read_only_store_is_one_line_and_a_complete_partition_still_serves(synth, tmp_path, tmpfs):
    empty = tmpfs("8m", "empty")
    remount_read_only(empty)
    one_line_error(fsad(*embed_args(synth, empty), home=tmp_path), "feature store folder is not writable")

    built = tmp_path / "built"
    assert fsad(*embed_args(synth, built), home=tmp_path).returncode == 0
    full = tmpfs("8m", "full")
    shutil.copytree(built, full / "store")
    remount_read_only(full)
    hit = fsad(*embed_args(synth, full / "store"), home=tmp_path)
    assert hit.returncode == 0 and hit.stdout.startswith("cache hit: "), hit.stderr[-2000:]
    assert hit.stderr == ""
    check = fsad("store", "verify", "--store", full / "store", home=tmp_path)
    assert check.returncode == 0 and "0 damaged" in check.stdout


def test_two_processes_building_one_partition_build_it_once(synth, tmp_path):
    root, category = synth
    store = FeatureStore(tmp_path / "store")
    key = store.key_for(load_category(root, category), FeatureSpec(image_size=SIZE))
    env = {**os.environ, "FSAD_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fewshot_core", *map(str, embed_args(synth, store.root))]
    logs = [tmp_path / f"err{i}.txt" for i in range(2)]
    with store.lock(key):  # both start while the partition is "being built", so they really race
        procs = [subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=open(log, "w"), text=True) for log in logs]
        deadline = time.monotonic() + 300
        while not all("waiting to reuse it" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                log.read_text() for log in logs]
            time.sleep(0.1)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [log.read_text() for log in logs]
    assert sorted(o.split(":")[0].split(" ")[0] for o in outs) == ["built", "cache"]  # one built, one reused
    assert all(key in o for o in outs)
    assert store.keys() == [key] and leftovers(store.root) == [] and verify_partition(store.root / key) == []
    reference = FeatureStore(tmp_path / "ref").build(load_category(root, category), FeatureSpec(image_size=SIZE),
                                                     EmbedCompute(batch_size=4, num_workers=0, progress=False))
    # The same features as a build in this process, to float16 rounding: another thread count may sum a
    # convolution in another order and move the stored value by one float16 step (2^-10 of it).
    np.testing.assert_allclose(store.open(key).patch().astype(np.float32), reference.patch().astype(np.float32),
                               rtol=2**-9, atol=2**-9)


def test_builder_killed_mid_build_leaves_no_partition_and_the_next_build_proceeds(synth, tmp_path):
    root, category = synth
    store = tmp_path / "store"
    key = FeatureStore(store).key_for(load_category(root, category), FeatureSpec(image_size=SIZE))
    env = {**os.environ, "FSAD_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fewshot_core", *map(str, embed_args(synth, store))],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(store.glob(f".tmp-{key}-{proc.pid}-*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert FeatureStore(store).keys() == []

    again = fsad(*embed_args(synth, store), home=tmp_path)
    assert again.returncode == 0 and again.stdout.startswith(f"built {key}"), again.stderr[-2000:]
    assert leftovers(store) == [] and verify_partition(store / key) == []


def test_patch_dim_above_the_feature_width_is_one_line(synth, tmp_path, capsys):
    assert main([str(a) for a in embed_args(synth, tmp_path / "store")] + ["--patch-dim", "4096"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fsad: error: --patch-dim 4096: larger than the 168 dims of tf_efficientnet_lite2 stages 2,3 "
                   "(it would only repeat values); use at most 168 or omit it"]
