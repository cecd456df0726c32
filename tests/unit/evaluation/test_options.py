"""What travels with a protocol call travels in small frozen groups (``evaluation/options.py``): no protocol
entry point takes a long keyword list, and an option a protocol has no use for is refused, not ignored."""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest

from fewshot_core.errors import FsadError
from fewshot_core.evaluation import oneclass, run, supervised, transductive
from fewshot_core.evaluation.options import EpisodeOptions, EvalContext, SupervisedDraw, context_of
from fewshot_core.evaluation.threshold import ThresholdConfig

ENTRY_POINTS = [oneclass.evaluate_oneclass, oneclass.run_oneclass_episode, transductive.evaluate_transductive,
                transductive.run_transductive_episode, supervised.evaluate_supervised,
                supervised.run_supervised_episode, run.evaluate_setting, run._scored, run._supervised]


@pytest.mark.parametrize("func", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_protocol_entry_points_take_few_parameters(func):
    assert len(inspect.signature(func).parameters) <= 8


def test_the_groups_are_frozen_and_a_context_always_has_a_cache():
    for group in (EpisodeOptions(), SupervisedDraw(1, 1), EvalContext()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            group.__setattr__(dataclasses.fields(group)[0].name, None)
    ctx = context_of(None)
    assert ctx.cache is not None and context_of(ctx) is ctx  # one cache shared across the seeds of a call


@pytest.mark.parametrize("options", [EpisodeOptions(augment="images"), EpisodeOptions(config="auto"),
                                     EpisodeOptions(align="always"), EpisodeOptions(threshold=ThresholdConfig())])
def test_the_transductive_protocol_refuses_one_class_only_options(options):
    episode = SimpleNamespace(support_ids=(), query_ids=("c",), seed=0)
    with pytest.raises(FsadError, match="one-class only") as exc:
        transductive.run_transductive_episode(None, object(), episode, "musc", options=options)
    assert "\n" not in str(exc.value)
