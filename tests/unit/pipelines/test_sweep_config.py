"""The sweep YAML schema: strict keys and types, no repeated grid values, one-line errors naming the key and
the fix; the same files as before still load."""

from __future__ import annotations

import textwrap

import pytest

from fewshot_core.backbones import DEFAULT_BACKBONE
from fewshot_core.errors import FsadError
from pipelines.config import QUICK_LOOK_IMAGE_SIZE, STANDARD_IMAGE_SIZE, SweepConfig, load_config


def _load(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(text))
    return path, load_config(path)


def _refused(tmp_path, text) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(FsadError) as exc:
        load_config(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and ";" in message and "\n" not in message
    return message


@pytest.mark.parametrize("text, key, fix", [
    ("oneclass: {shot: [1, 2]}\n", "oneclass.shot", "shots, seeds"),
    ("data: {rooot: /data}\n", "data.rooot", "source, root"),
    ("data: {synth: {categoriez: 2}}\n", "data.synth.categoriez", "n_train"),
    ("methods: [{method: knn, parms: {}}]\n", "methods[0].parms", "params"),
    ("bogus: 1\n", "bogus", "oneclass"),
])
def test_unknown_nested_keys_are_refused_naming_the_key_and_the_allowed_ones(tmp_path, text, key, fix):
    message = _refused(tmp_path, text)
    assert f"unknown key {key}" in message and fix in message


@pytest.mark.parametrize("text, key", [
    ("oneclass: {shots: [1.7]}\n", "oneclass.shots[0]"),
    ("oneclass: {shots: [true]}\n", "oneclass.shots[0]"),
    ("oneclass: {seeds: ['0']}\n", "oneclass.seeds[0]"),
    ("supervised: {ratios: [[1, 1.5]]}\n", "supervised.ratios[0][1]"),
    ("image_size: 112.0\n", "image_size"),
])
def test_non_integer_grid_values_are_refused(tmp_path, text, key):
    message = _refused(tmp_path, text)
    assert key in message and "whole number" in message


@pytest.mark.parametrize("text, what", [
    ("oneclass: {shots: [1, 2, 1]}\n", "repeated shots 1"),
    ("oneclass: {seeds: [0, 0, 1]}\n", "repeated seeds 0"),
    ("supervised: {seeds: [3, 3]}\n", "repeated seeds 3"),
    ("supervised: {ratios: [[1, 1], [3, 1], [1, 1]]}\n", "repeated ratios"),
    ("supervised: {label_modes: [binary, binary]}\n", "repeated label_modes binary"),
    ("backbones: [tf_efficientnet_lite0, tf_efficientnet_lite0]\n", "repeated backbones"),
    ("methods: [{method: knn}, {id: knn, method: patchcore}]\n", "repeated method ids knn"),
])
def test_repeated_grid_values_are_refused_in_one_line(tmp_path, text, what):
    assert what in _refused(tmp_path, text)


@pytest.mark.parametrize("text, message", [
    ("methods: [{method: nope}]\n", "unknown method 'nope'"),
    ("methods: [{method: protonet, protocol: oneclass}]\n", "protocol oneclass not available"),
    ("transductive: {shots: [-1]}\n", "transductive.shots[0] -1: input should be greater than or equal to 0"),
    ("oneclass: {shots: [0]}\n", "oneclass.shots[0] 0: input should be greater than or equal to 1"),
    ("supervised: {label_modes: [triple]}\n", "supervised.label_modes[0] 'triple'"),
    ("data: {source: layout}\n", "needs data.layouts"),
    ("data: [unclosed\n", "not valid YAML"),
    ("- 1\n", "top level must be a mapping"),
    ("methods: [{id: 'bad id', method: knn}]\n", "methods[0].id"),
])
def test_other_mistakes_name_the_setting(tmp_path, text, message):
    assert message in _refused(tmp_path, text)


def test_the_documented_example_still_loads(tmp_path):
    from pipelines import config

    example = config.__doc__.split("e.g.::", 1)[1].split("\n\n")[1]
    _, cfg = _load(tmp_path, textwrap.dedent(example))
    assert cfg.name == "bottle-sweep" and cfg.categories == ["bottle"] and cfg.image_size == 224
    assert cfg.shots == [1, 2, 4, 8] and cfg.ratios == [(1, 1), (5, 1), (10, 1)]
    assert [m.id for m in cfg.method_specs()] == ["patchcore", "protonet-cosine", "caml", "musc"]
    assert cfg.method_specs()[2].meta_pool == "synthetic"
    assert cfg.data_root == str((tmp_path / "../shared/data/mvtec_ad").resolve())
    assert {s.key for s in cfg.oneclass_settings()} >= {"oc-k8-s4"}
    assert [s.key for s in cfg.settings_for(cfg.method_specs()[3])] == ["td-k0-s0", "td-k0-s1", "td-k1-s0", "td-k1-s1"]


def test_method_policy_comes_from_the_registry(tmp_path):
    _, cfg = _load(tmp_path, """\
        supervised: {ratios: [[1, 1]], label_modes: [binary, multiclass], seeds: [0]}
        transductive: {shots: [0, 2], seeds: [0]}
        methods:
          - {id: pc-sup, method: patchcore, protocol: supervised}
          - {method: protonet}
          - {method: knn}
          - {method: musc}
        """)
    by_id = {s.id: [k.key for k in cfg.settings_for(s)] for s in cfg.method_specs()}
    assert by_id["pc-sup"] == ["sup-g1b1-bin-s0"]  # a one-class method cannot name defect types
    assert by_id["protonet"] == ["sup-g1b1-bin-s0", "sup-g1b1-multi-s0"]
    assert by_id["knn"][0] == "oc-k1-s0"
    assert by_id["musc"] == ["td-k0-s0", "td-k2-s0"]  # the transductive family runs its own grid


def test_image_size_defaults_to_the_standard_resolution_on_real_data(monkeypatch, tmp_path):
    monkeypatch.delenv("MVTEC_ROOT", raising=False)
    assert SweepConfig().resolved_image_size() == QUICK_LOOK_IMAGE_SIZE
    assert "quick look" in SweepConfig().image_size_note()
    monkeypatch.setenv("MVTEC_ROOT", str(tmp_path))
    assert SweepConfig().resolved_image_size() == STANDARD_IMAGE_SIZE == 256
    assert "standard" in SweepConfig().image_size_note()
    assert SweepConfig(image_size=128).resolved_image_size() == 128
    assert "quick look" in SweepConfig(image_size=128).image_size_note()


def test_work_dir_defaults_to_the_dagster_home_never_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert SweepConfig().resolved_work_dir() == tmp_path / "dagster_home" / "fsad"
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "h"))
    assert SweepConfig().resolved_work_dir() == tmp_path / "h" / "fsad"


def test_meta_trained_methods_choose_their_pool(tmp_path):
    (tmp_path / "other_root").mkdir()
    _, cfg = _load(tmp_path, """\
        methods:
          - {id: caml-cats, method: caml}
          - {id: caml-synth, method: caml, meta_pool: "synthetic:3"}
          - {id: caml-root, method: caml, meta_pool: other_root}
        """)
    pools = {m.id: m.meta_pool for m in cfg.method_specs()}
    assert pools == {"caml-cats": None, "caml-synth": "synthetic:3", "caml-root": str(tmp_path / "other_root")}
    assert "not a folder" in _refused(tmp_path, "methods: [{method: caml, meta_pool: nowhere}]")
    assert "meta-trained" in _refused(tmp_path, "methods: [{method: protonet, meta_pool: synthetic}]")


def test_champion_criterion_and_full_data_model_are_sweep_keys(tmp_path):
    from fewshot_core.models.champion import ChampionCriterion
    from pipelines.definitions import build_definitions

    default = SweepConfig()
    assert ChampionCriterion(**default.champion) == ChampionCriterion()
    assert default.full_data == {"method": "patchcore", "params": {}, "backbone": None}
    _, cfg = _load(tmp_path, """
        champion: {metric: balanced_accuracy, protocol: supervised, shots: 3}
        full_data: {method: knn, params: {k: 3}}
    """)
    crit = ChampionCriterion(**cfg.champion)
    assert crit.key() == "supervised:balanced_accuracy@3"
    assert cfg.full_data == {"method": "knn", "params": {"k": 3}, "backbone": None}
    assert cfg.full_data_backbone() == DEFAULT_BACKBONE  # the sweep's first backbone
    champion = next(a for a in build_definitions(cfg).assets if a.key.to_user_string() == "champion")
    assert "supervised:balanced_accuracy@3" in champion.descriptions_by_key[champion.key]
    _, off = _load(tmp_path, "full_data: null\n")
    keys = {a.key.to_user_string() for a in build_definitions(off).assets}
    assert off.full_data is None and "full_data_model" not in keys
    assert "full_data_model" in {a.key.to_user_string() for a in build_definitions(cfg).assets}


@pytest.mark.parametrize("text, message", [
    ("champion: {metric: fit_seconds}\n", "champion.metric"),
    ("champion: {metrc: image_auroc}\n", "unknown key champion.metrc"),
    ("full_data: {method: efficientad}\n", "not a feature-based one-class detector"),
    ("full_data: {method: protonet}\n", "not a feature-based one-class detector"),
    ("full_data: {method: patchcor}\n", "full_data.method 'patchcor' is unknown"),
    ("full_data: {backbone: resnet18}\n", "not one of the sweep's backbones"),
])
def test_bad_champion_and_full_data_keys_are_refused(tmp_path, text, message):
    assert message in _refused(tmp_path, text)


def test_aspect_reaches_the_feature_store(tmp_path):
    """``aspect`` (auto by default, square, or a ratio) is the long side of every partition the sweep builds."""
    from pipelines.definitions import build_definitions

    _, cfg = _load(tmp_path, "aspect: square\n")
    assert cfg.aspect == "square"
    _, ratio = _load(tmp_path, "aspect: 2.5\n")
    assert ratio.aspect == 2.5
    assert SweepConfig().aspect == "auto"
    assert "aspect" in _refused(tmp_path, "aspect: wide\n")
    defs = build_definitions(cfg)
    assert defs.resources["feature_store"].aspect == "square"


def test_meta_pool_is_read_as_on_the_command_line(tmp_path):
    # a folder whose name starts with "synthetic" is a root, not generated categories
    (tmp_path / "synthetic_roots").mkdir()
    _, cfg = _load(tmp_path, "methods: [{id: caml, method: caml, meta_pool: synthetic_roots}]")
    assert cfg.method_specs()[0].meta_pool == str(tmp_path / "synthetic_roots")
    assert "synthetic:N with N >= 1" in _refused(tmp_path, "methods: [{method: caml, meta_pool: 'synthetic:x'}]")


def test_the_evaluation_asset_builds_the_pool_the_sweep_names(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fewshot_core.evaluation import meta_pool as pools
    from pipelines.assets import evaluation

    built = []
    monkeypatch.setattr(pools, "synthetic_pool", lambda *a, categories, **k: built.append(("synthetic", categories)))
    monkeypatch.setattr(pools, "root_pool", lambda root, *a, **k: built.append(("root", root)))
    context = SimpleNamespace(instance=SimpleNamespace(get_dynamic_partitions=lambda name: ["bottle"]))
    store = SimpleNamespace(batch_size=4, num_workers=0, image_size=32, store=lambda: None)
    device = SimpleNamespace(resolve=lambda: "cpu")
    cfg = SweepConfig(work_dir=str(tmp_path))
    (tmp_path / "synthetic_roots").mkdir()
    for source in (None, "categories", "synthetic:3", str(tmp_path / "synthetic_roots")):
        evaluation._meta_pool(cfg, context, "b", store, device, source)
    # one category: the sweep's other categories are generated ones (the default count)
    assert built == [("synthetic", pools.GENERATED), ("synthetic", pools.GENERATED), ("synthetic", 3),
                     ("root", tmp_path / "synthetic_roots")]
