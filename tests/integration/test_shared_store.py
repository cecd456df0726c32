"""Two workers building one feature-store partition at the same moment (the cluster profile's shared store):
both succeed, both read the same complete partition, and nothing half-written or temporary is left."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]

WRITER = """
import hashlib, json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from fewshot_core.data.mvtec import load_category
from fewshot_core.features import EmbedCompute, FeatureSpec, FeatureStore

data, store, go, ready = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
ds = load_category(Path(data), "synth_fabric")
ready.touch()
while not go.exists():  # both writers are past their imports before either looks at the store
    time.sleep(0.01)
part = FeatureStore(store).build(ds, FeatureSpec("resnet18", 64, weights="random"),
                                 EmbedCompute(num_workers=0, progress=False))
digest = hashlib.sha256(part.patch().tobytes() + part.global_().tobytes()).hexdigest()
print(json.dumps({"key": part.key, "cache_hit": part.cache_hit, "digest": digest}))
"""


def test_two_concurrent_writers_of_one_partition_never_corrupt_it(tmp_path):
    from fewshot_core.data.synth import generate

    generate(tmp_path / "data", categories=1, seed=0, size=64, n_train=8, n_test_good=4, n_test_per_defect=2)
    store, go = tmp_path / "store", tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "data"), str(store), str(go), str(r)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    deadline = time.monotonic() + 600
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # one built it; the other built it too (the loser's rename is discarded) or waited and reused it
    assert not all(r["cache_hit"] for r in results)
    assert results[0]["key"] == results[1]["key"] and results[0]["digest"] == results[1]["digest"]
    names = sorted(p.name for p in store.iterdir())
    assert not [n for n in names if n.startswith(".tmp-")], names  # no temp folder of the losing writer
    entries = [n for n in names if not n.startswith(".")]  # the store's own lock and hash-cache files aside
    assert entries == [results[0]["key"]], entries  # one partition
    part = store / entries[0]
    assert {"global.npy", "index.parquet", "meta.json", "patch.npy"} <= {p.name for p in part.iterdir()}
    assert json.loads((part / "meta.json").read_text())["key"] == entries[0]
    # the partition on disk is what both writers read
    from fewshot_core.features import FeatureStore

    reread = FeatureStore(store).open(entries[0])
    digest = hashlib.sha256(reread.patch().tobytes() + reread.global_().tobytes()).hexdigest()
    assert digest == results[0]["digest"]
