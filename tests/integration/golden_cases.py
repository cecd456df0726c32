"""The golden cases: which method runs on which data with which setting (see test_golden_rows.py).

Each case calls the protocol entry points (``evaluate_oneclass`` / ``evaluate_supervised``) the way a user
of the library does; ``run_case`` is the one place that knows how.
"""

from __future__ import annotations

from pathlib import Path
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext, SupervisedDraw
from fewshot_core.features.store import EmbedCompute, FeatureSpec

SYNTH_SIZE = 64
BOTTLE_SIZE = 128
FAST: dict = {"foreground": "none"}  # recorded before object-centric scoring became the default
TRAINED = {"image_size": 64}
BACKBONE = "tf_efficientnet_lite0"  # recorded with it, the default before Lite2
ALIGN = "none"  # recorded before align="auto" became the default: the rows guard the methods, unaligned

CASES: dict[str, dict] = {}


def _case(name, **spec):
    CASES[name] = spec


for data in ("synth", "bottle"):
    bottle = data == "bottle"
    for method, params in (("patchcore", FAST), ("knn", FAST), ("ldknn", FAST)):
        for shots in (1, 4):
            _case(f"{data}-oc-{method}-k{shots}", bottle=bottle, data=data, protocol="oneclass", method=method,
                  params=params, shots=shots, seeds=[0, 1])
    _case(f"{data}-oc-patchcore-k2-augimages", bottle=bottle, data=data, protocol="oneclass", method="patchcore",
          params=FAST, shots=2, seeds=[0], augment="images")
    _case(f"{data}-oc-ldknn-k2-augfeatures", bottle=bottle, data=data, protocol="oneclass", method="ldknn",
          params=FAST, shots=2, seeds=[0], augment="features")
    for distance in ("euclidean", "cosine"):
        for mode in ("binary", "multiclass"):
            _case(f"{data}-sup-protonet-{distance}-{mode}", bottle=bottle, data=data, protocol="supervised",
                  method="protonet", params={"distance": distance}, k_good=2, k_bad=1, label_mode=mode,
                  seeds=[0, 1])
    for method in ("patchcore", "ldknn"):
        _case(f"{data}-sup-{method}-binary", bottle=bottle, data=data, protocol="supervised", method=method,
              params=FAST, k_good=3, k_bad=1, label_mode="binary", seeds=[0, 1])
    _case(f"{data}-sup-caml-multiclass", bottle=bottle, data=data, protocol="supervised", method="caml",
          params={"train": {"steps": 6, "episodes_per_step": 2, "time_budget_s": 600}}, k_good=2, k_bad=1,
          label_mode="multiclass", seeds=[0, 1], caml_pool=True)
    _case(f"{data}-sup-pmf-binary", bottle=bottle, data=data, protocol="supervised", method="pmf",
          params={"steps": 2, "search_steps": 1, "lr_candidates": [1e-3], "image_size": 64,
                  "backbone": BACKBONE, "time_budget_s": 3600}, k_good=2, k_bad=1, label_mode="binary", seeds=[0])

for method, params in (("efficientad", {"steps": 3, "teacher_steps": 2, "penalty": "none"}),
                       ("glass", {"steps": 4, "batch_size": 2, "dsc_hidden": 64, "ascent_steps": 2}),
                       ("reb", {"steps": 3, "batch_size": 4})):
    _case(f"synth-oc-{method}-k2", data="synth", protocol="oneclass", method=method,
          params={**TRAINED, **params}, shots=2, seeds=[0], trained=True)


class GoldenEnv:
    """Datasets and feature-store partitions, built once per test module."""

    def __init__(self, tmp: Path, mvtec_root: Path | None, bottle_store: Path | None = None):
        from fewshot_core.data.synth import generate

        self.tmp = Path(tmp)
        # real bottle's partitions may come from a store other tests share (conftest.py's bottle_store)
        self.bottle_store = Path(bottle_store) if bottle_store is not None else self.tmp / "store"
        self.synth_root = self.tmp / "synth"
        generate(self.synth_root, categories=3, seed=0, size=96, n_train=12, n_test_good=6, n_test_per_defect=4)
        self.mvtec_root = mvtec_root
        self._cache: dict = {}

    def dataset(self, data: str, category: str | None = None):
        from fewshot_core.data import load_dataset

        if data == "synth":
            root = self.synth_root
            category = category or sorted(p.name for p in root.iterdir() if p.is_dir())[0]
        else:
            root, category = self.mvtec_root, category or "bottle"
        key = ("ds", str(root), category)
        if key not in self._cache:
            self._cache[key] = load_dataset(root, category)
        return self._cache[key]

    def partition(self, dataset, size: int):
        from fewshot_core.features.store import FeatureStore

        key = ("part", str(dataset.root), dataset.category, size)
        if key not in self._cache:
            synthetic = dataset.root.resolve() == self.synth_root.resolve()
            store = self.tmp / "store" if synthetic else self.bottle_store
            self._cache[key] = FeatureStore(store).build(dataset, FeatureSpec(BACKBONE, size),
                                                         EmbedCompute(num_workers=0, progress=False))
        return self._cache[key]

    def caml_pool_pairs(self, exclude: str):
        """The other synthetic categories, embedded at the synthetic size."""
        cats = sorted(p.name for p in self.synth_root.iterdir() if p.is_dir())
        pairs = []
        for c in cats:
            if c == exclude:
                continue
            ds = self.dataset("synth", c)
            pairs.append((ds, self.partition(ds, SYNTH_SIZE)))
        return pairs


def run_case(name: str, env: GoldenEnv) -> list[dict]:
    spec = CASES[name]
    ds = env.dataset(spec["data"])
    size = BOTTLE_SIZE if spec["data"] == "bottle" else SYNTH_SIZE
    params = dict(spec["params"])
    if spec["protocol"] == "oneclass":
        from fewshot_core.evaluation.oneclass import evaluate_oneclass

        if spec.get("trained"):  # trained on the images: no partition; one thread, no weight cache
            from fewshot_core.runtime import Runtime

            runtime = Runtime(device="cpu", threads=1, progress=False, artifact_dir=None)
            return evaluate_oneclass(ds, None, spec["method"], spec["shots"], spec["seeds"], params,
                                     options=EpisodeOptions(mask_size=size, align=ALIGN),
                                     context=EvalContext(runtime=runtime))
        return evaluate_oneclass(ds, env.partition(ds, size), spec["method"], spec["shots"], spec["seeds"], params,
                                 options=EpisodeOptions(mask_size=size, augment=spec.get("augment", "none"),
                                                        align=ALIGN))
    from fewshot_core.evaluation.meta_pool import pool_from_partitions
    from fewshot_core.evaluation.supervised import evaluate_supervised
    from fewshot_core.runtime import Runtime

    part = env.partition(ds, size)
    meta_pool = pool_from_partitions(env.caml_pool_pairs(ds.category)) if spec.get("caml_pool") else None
    return evaluate_supervised(ds, part, spec["method"],
                               SupervisedDraw(spec["k_good"], spec["k_bad"], label_mode=spec["label_mode"]),
                               spec["seeds"], params,
                               context=EvalContext(runtime=Runtime(artifact_dir=env.tmp / "artifacts"),
                                                   meta_pool=meta_pool))
