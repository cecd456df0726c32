"""Evaluation protocols run from the feature store, one row of metrics per episode.

``oneclass``: fit on k good images, score the whole test split (``evaluate_oneclass``,
``run_oneclass_episode``). ``supervised``: the thesis protocol (``evaluate_supervised``).
Import the submodule you need; this package imports nothing heavy itself.
"""
