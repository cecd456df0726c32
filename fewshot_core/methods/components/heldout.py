"""Held-out scores from a fitted bank model's own state (``Detector.heldout_scores``).

A bank method (PatchCore, kNN, LDKNN) records for every bank row the fitted map it came from
(``bank_source_``: the index into ``fit``'s X). Scoring a support image against the bank without the rows
of its own maps (its stored features and its augmented views) is then what a copy of the model that never
saw the image would do, with the model's own coreset rows, foreground estimate and scoring rule, and no
refit: the threshold's held-out good scores (``evaluation/threshold.py``) come from the model that is
deployed, not from copies that keep a different bank.
"""

from __future__ import annotations

import copy

import numpy as np

from fewshot_core.methods.base import as_patch_array
from fewshot_core.methods.components.foreground import PartBank
from fewshot_core.methods.components.nn_search import BankIndex, parse_index


def map_sources(rows: np.ndarray, rows_per_map: int) -> np.ndarray:
    """The fitted map each bank row came from: ``rows`` index the fit input's flattened patches."""
    return (np.asarray(rows, dtype=np.int64) // int(rows_per_map)).astype(np.int32)


def loaded_sources(arrays: dict, n_bank: int) -> np.ndarray | None:
    """``bank_source_`` from a saved state; None for a model saved before it was recorded (held-out scores
    then come from refitted copies)."""
    source = arrays.get("bank_source")
    if source is None:
        return None
    source = np.asarray(source, dtype=np.int32)
    return source if source.shape == (n_bank,) else None


def without_maps(model, left_out):
    """A shallow copy of the fitted ``model`` whose bank lacks the rows of the fitted maps ``left_out``
    (an empty bank when every row came from them). Its index is exact unless the user chose one: one
    image's search of the whole bank costs less than training an IVF index on it (``index="auto"`` is
    IVF above ``AUTO_IVF_ROWS`` rows for the many queries of a test set), and an exact search is the
    model's bank as it is."""
    source = model.bank_source_
    keep = np.flatnonzero(~np.isin(source, np.asarray(left_out, dtype=np.int64)))
    sub = copy.copy(model)
    sub.bank_ = np.ascontiguousarray(model.bank_[keep])
    sub.bank_source_ = source[keep]
    if not len(keep):
        return sub
    if parse_index(model.index)[0] == "auto":
        sub.index = "flat"  # the copy's own parameter: the model keeps its index
    sub.nn_ = sub._index(sub.bank_)
    sub.part_ = PartBank(model.foreground_, sub.bank_, sub._index)
    return sub


class BankHeldout(BankIndex):
    """The held-out capability of a bank detector (mixed in before ``Detector``): ``heldout_scores`` scores
    images with the fitted model's bank less the rows of the left-out maps, by ``_heldout_score``, the
    copy's index built as the model's own (``BankIndex``)."""

    def can_score_heldout(self) -> bool:
        return getattr(self, "bank_source_", None) is not None

    def heldout_scores(self, X, left_out) -> np.ndarray:
        self._check_fitted()
        if not self.can_score_heldout():
            raise ValueError(f"{type(self).__name__}: no bank provenance (saved before it was recorded, or a "
                             "density that the bank cannot recompute); refit held-out copies instead")
        X = as_patch_array(X, "held-out images")
        sub = without_maps(self, left_out)
        if not len(sub.bank_):  # every row came from the left-out maps: nothing to score against
            return np.full(len(X), np.nan)
        return np.asarray(sub._heldout_score(X), dtype=np.float64)

    def _heldout_score(self, X) -> np.ndarray:
        return self.score(X)[0]


def source_array(model) -> dict:
    """The ``bank_source`` array a bank method saves with its state (none when it has no provenance)."""
    source = getattr(model, "bank_source_", None)
    return {} if source is None else {"bank_source": np.asarray(source, dtype=np.int32)}
