"""The sweep YAML as written, validated strictly (pydantic): unknown keys at any depth, wrong types
(``shots: [1.7]``, ``[true]``) and repeated grid values are refused with one line naming the key and the fix.

``pipelines/config.py`` turns a validated file into the ``SweepConfig`` the pipeline runs; nothing here
knows about Dagster.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fewshot_core import schema
from fewshot_core.backbones import DEFAULT_BACKBONE
from fewshot_core.schema import Protocol
from fewshot_core.models.champion import ChampionCriterion
from fewshot_core.sizes import MIN_BACKBONE_SIZE

StrictInt = Annotated[int, Field(strict=True)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
MethodId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]+$")]


def _unique(values: list, what: str) -> list:
    seen, dup = set(), []
    for v in values:
        key = tuple(v) if isinstance(v, list) else v
        if key in seen and v not in dup:
            dup.append(v)
        seen.add(key)
    if dup:
        raise ValueError(f"repeated {what} {', '.join(map(str, dup))}: each value once (repeats would skew "
                         "mean and spread over seeds)")
    return values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # ints are strict field by field


class SynthSection(_Strict):
    categories: PositiveInt = 2
    seed: NonNegativeInt = 0
    size: Annotated[int, Field(strict=True, ge=16)] = 112
    n_train: PositiveInt = 12
    n_test_good: PositiveInt = 6
    n_test_per_defect: PositiveInt = 3


class DataSection(_Strict):
    source: Literal["auto", "synthetic", "mvtec", "download", "layout"] = "auto"
    root: str | None = None
    layouts: list[str] | None = None
    categories: list[str] | None = None
    synth: SynthSection = SynthSection()

    @field_validator("categories", "layouts")
    @classmethod
    def _no_repeats(cls, v, info):
        return None if v is None else _unique(v, info.field_name)


class OneclassSection(_Strict):
    shots: list[PositiveInt] = [1, 2, 4]
    seeds: list[NonNegativeInt] = [0, 1]

    @field_validator("shots", "seeds")
    @classmethod
    def _no_repeats(cls, v, info):
        return _unique(v, info.field_name)


class SupervisedSection(_Strict):
    ratios: list[tuple[PositiveInt, NonNegativeInt]] = [(1, 1), (3, 1), (1, 2), (3, 2)]
    label_modes: list[Literal["binary", "multiclass"]] = ["binary", "multiclass"]
    seeds: list[NonNegativeInt] = [0, 1]

    @field_validator("ratios", "label_modes", "seeds")
    @classmethod
    def _no_repeats(cls, v, info):
        return _unique(v, info.field_name)


class TransductiveSection(_Strict):
    """The transductive grid (methods of that family, e.g. musc): good shots beside the unlabeled test images
    (0: none, the test images scored against each other only) and seeds."""
    shots: list[NonNegativeInt] = [0]
    seeds: list[NonNegativeInt] = [0, 1]

    @field_validator("shots", "seeds")
    @classmethod
    def _no_repeats(cls, v, info):
        return _unique(v, info.field_name)


class MethodItem(_Strict):
    method: str
    id: MethodId | None = None
    params: dict[str, Any] = {}
    protocol: Literal[Protocol.ONECLASS.value, Protocol.SUPERVISED.value] | None = None
    # meta-trained methods (CAML): "categories" (the sweep's other categories; generated ones when it has
    # only one), "synthetic" / "synthetic:N" (N generated categories), or the path of another MVTec root;
    # read by fewshot_core.evaluation.meta_pool.parse_source alone (pipelines/config.py), as on the command line
    meta_pool: str | None = None


# Metrics a champion can be chosen by: the schema's higher-is-better ones (champion.py ranks by "higher wins")
CHAMPION_METRICS = tuple(name for name, col in schema.METRICS.items() if col.higher_is_better)


class ChampionSection(_Strict):
    """How the champion per category is chosen (``fewshot_core.models.champion.ChampionCriterion``)."""
    metric: Literal[CHAMPION_METRICS] = ChampionCriterion.metric  # the one default: champion.py
    protocol: Literal[Protocol.ONECLASS.value, Protocol.SUPERVISED.value] = Protocol.ONECLASS.value
    tiebreak: Literal[CHAMPION_METRICS] = ChampionCriterion.tiebreak
    shots: PositiveInt | None = None  # None: the largest shot count of the sweep


class FullDataSection(_Strict):
    """The full-data model per category: one feature-based detector fitted on every good training image."""
    method: str = "patchcore"
    params: dict[str, Any] = {}
    backbone: str | None = None  # None: the sweep's first backbone


class SweepFile(_Strict):
    name: Annotated[str, Field(min_length=1)] = "fsad-default"
    data: DataSection = DataSection()
    backbones: list[str] = [DEFAULT_BACKBONE]
    # None: the methods' standard resolution on real data, a quick look on the synthetic demo (config.py)
    image_size: Annotated[int, Field(strict=True, ge=MIN_BACKBONE_SIZE)] | None = None
    # the long side (fewshot_core.data.aspect): auto keeps each category's height/width, square squashes
    aspect: Literal["auto", "square"] | Annotated[float, Field(gt=0)] = "auto"
    oneclass: OneclassSection = OneclassSection()
    supervised: SupervisedSection = SupervisedSection()
    transductive: TransductiveSection = TransductiveSection()
    methods: list[MethodItem] | None = None
    champion: ChampionSection = ChampionSection()
    full_data: FullDataSection | None = FullDataSection()  # null: no full-data model
    work_dir: str | None = None

    @field_validator("backbones")
    @classmethod
    def _no_repeats(cls, v, info):
        return _unique(v, info.field_name)

    @field_validator("methods")
    @classmethod
    def _unique_ids(cls, v):
        if v is not None:
            _unique([m.id or m.method for m in v], "method ids")
        return v


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model that holds the last key of ``loc`` (list indices skipped), for listing its keys."""
    model: Any = SweepFile
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        for candidate in (ann, *getattr(ann, "__args__", ())):
            inner = (*getattr(candidate, "__args__", ()), candidate)
            found = next((c for c in inner if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if found is not None:
                model = found
                break
        else:
            return None
    return model


def describe(exc: ValidationError) -> tuple[str, str]:
    """(problem, fix) for the first error of ``exc``: the dotted key, what is wrong, and what to write."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc)
        allowed = ", ".join(model.model_fields) if model is not None else "the keys in the example"
        return f"unknown key {key}", f"use one of {allowed} (see pipelines/config.py)"
    value = err.get("input")
    shown = f" {value!r}" if not isinstance(value, (dict, list)) else ""
    if kind in ("int_type", "int_from_float", "int_parsing"):
        return f"{key}{shown} is not a whole number", "write an integer such as 1 or 4"
    if kind in ("greater_than_equal", "greater_than"):
        return f"{key}{shown}: {err['msg'].lower()}", f"fix {key}"
    if kind == "literal_error":
        return f"{key}{shown}: {err['msg'].lower()}", f"fix {key}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}{shown}: {msg}", f"fix {key} (see the example in pipelines/config.py)"
