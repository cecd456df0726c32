"""Shared fixtures. Real-data tests skip with a clear reason where ../shared is absent (a fresh clone)."""

from __future__ import annotations

import os

import pytest

from fewshot_core.paths import shared_mvtec_root

# Tests must never reach the internet or a user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", "")  # each test that needs MLflow sets its own


@pytest.fixture(autouse=True)
def _tracking_uri_put_back():
    """A test that leaves the process's MLflow tracking URI changed (``mlflow.set_tracking_uri`` writes the
    environment) points every later test of its worker at its store; on two workers which tests come later
    changes from run to run. Fail the test that leaked it, not the one that followed."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    after = os.environ.get("MLFLOW_TRACKING_URI")
    assert after == before, (f"the test left MLFLOW_TRACKING_URI={after!r} (was {before!r}); use "
                             "fewshot_core.tracking.store.fluent_uri or monkeypatch.setenv")


@pytest.fixture(scope="session")
def mvtec_root():
    """Root of the real MVTec AD data (../shared/data/mvtec_ad or MVTEC_ROOT); skips where absent."""
    root = shared_mvtec_root()
    if root is None or not (root / "bottle" / "train" / "good").is_dir():
        pytest.skip("real MVTec AD bottle not found: set MVTEC_ROOT or provide ../shared/data/mvtec_ad")
    return root


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A tiny deterministic synthetic MVTec-layout dataset (2 categories, 96 px) shared by the suite."""
    from fewshot_core.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, categories=2, seed=0, size=96, n_train=12, n_test_good=6, n_test_per_defect=4)
    return root


@pytest.fixture(scope="session")
def bottle_store(tmp_path_factory):
    """One feature-store folder for the real bottle's partitions, shared by the tests that embed bottle at
    the same size: the store is content-addressed, so the first build embeds and later ones reopen it.
    Tests only build and read bottle partitions in it (a derived copy of bottle goes to the test's own store)."""
    return tmp_path_factory.mktemp("bottle_store")
