"""The meta-training pool's source, read in one place for the command line and the sweep file."""

from __future__ import annotations

import pytest

from fewshot_core.errors import FsadError
from fewshot_core.evaluation.meta_pool import GENERATED, PoolSource, build_pool, parse_source
from fewshot_core.features.store import FeatureSpec


def test_words_counts_and_folders(tmp_path):
    (tmp_path / "synthetic-like").mkdir()
    assert parse_source("root", others="root", where="--meta-pool") == PoolSource("others")
    assert parse_source("categories", others="categories", where="x") == PoolSource("others")
    assert parse_source("synthetic", others="root", where="x") == PoolSource("synthetic", GENERATED)
    assert parse_source("synthetic:3", others="root", where="x") == PoolSource("synthetic", 3)
    assert parse_source("synthetic-like", others="root", where="x", base=tmp_path) == \
        PoolSource("root", root=tmp_path / "synthetic-like")
    # a front end's word is not the other's: "categories" on the command line is a (missing) folder
    with pytest.raises(FsadError, match=r"^--meta-pool categories: not a folder"):
        parse_source("categories", others="root", where="--meta-pool", base=tmp_path)
    for bad in ("synthetic:0", "synthetic:", "synthetic:two"):
        with pytest.raises(FsadError, match="synthetic:N with N >= 1"):
            parse_source(bad, others="root", where="--meta-pool")


def test_build_dispatches_to_the_front_ends_other_categories(tmp_path):
    marker = object()
    spec = FeatureSpec("b", 32)
    assert build_pool(PoolSource("others"), None, spec, tmp_path, others=lambda: marker) is marker
