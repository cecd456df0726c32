"""Prototypical network on global embeddings: hand-checked geometry, learning on clusters, no leakage."""

import numpy as np
import pytest

from fewshot_core.methods.protonet import ProtoNet


def _clusters(seed, n_per=30, d=16, k=3, spread=0.5):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)) * 2
    X = np.concatenate([m + spread * rng.standard_normal((n_per, d)) for m in means]).astype(np.float32)
    y = np.repeat(np.array([f"c{i}" for i in range(k)]), n_per)
    return X, y


def test_euclidean_softmax_matches_hand_computation():
    X = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    y = np.array(["a", "a", "b"])
    p = ProtoNet("euclidean", temperature=2.0).fit(X, y)
    np.testing.assert_allclose(p.prototypes_, [[1.0, 0.0], [10.0, 0.0]])
    q = np.array([[4.0, 0.0]], dtype=np.float32)
    d = np.array([9.0, 36.0])  # squared distances to the two centroids
    expected = np.exp(-d / 2) / np.exp(-d / 2).sum()
    np.testing.assert_allclose(p.predict_proba(q)[0], expected, rtol=1e-6)
    assert list(p.classes_) == ["a", "b"]


def test_cosine_ignores_scale_euclidean_does_not():
    X = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    y = np.array(["x", "y"])
    q = np.array([[10.0, 9.0]], dtype=np.float32)  # far from both points, but closer in angle to x
    assert ProtoNet("cosine").fit(X, y).predict(q)[0] == "x"
    assert ProtoNet("cosine").fit(X * 100, y).predict(q)[0] == "x"
    probs = ProtoNet("cosine", temperature=0.1).fit(X, y).predict_proba(q)
    np.testing.assert_allclose(probs.sum(1), 1.0)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_learns_gaussian_clusters_well_above_chance(distance):
    X, y = _clusters(0)
    rng = np.random.default_rng(1)
    support = np.concatenate([rng.choice(np.flatnonzero(y == c), 2, replace=False) for c in np.unique(y)])
    query = np.setdiff1d(np.arange(len(y)), support)
    acc = (ProtoNet(distance).fit(X[support], y[support]).predict(X[query]) == y[query]).mean()
    assert acc > 0.9  # chance is 1/3


def test_prediction_depends_only_on_support():
    """Queries never enter fitting: moving the queries changes nothing about the fitted prototypes."""
    X, y = _clusters(2)
    support = np.arange(0, len(y), 10)
    p1 = ProtoNet().fit(X[support], y[support])
    protos = p1.prototypes_.copy()
    q = np.random.default_rng(0).standard_normal((5, X.shape[1])).astype(np.float32) * 100
    a = p1.predict_proba(q)
    np.testing.assert_array_equal(p1.prototypes_, protos)
    # Each query's row is independent of the others in the batch (no transduction).
    np.testing.assert_allclose(p1.predict_proba(q[:1]), a[:1])


def test_log_proba_keeps_ranking_where_probabilities_saturate():
    X = np.array([[0.0], [100.0]], dtype=np.float32)
    p = ProtoNet().fit(X, np.array(["good", "bad"]))
    q = np.array([[1.0], [2.0]], dtype=np.float32)
    probs = p.predict_proba(q)
    good = list(p.classes_).index("good")
    assert 1 - probs[0, good] == 1 - probs[1, good] == 0.0  # saturated in float64
    logp = p.predict_log_proba(q)
    assert logp[1, 1 - good] > logp[0, 1 - good]  # still ordered


def test_bad_arguments():
    with pytest.raises(ValueError):
        ProtoNet("manhattan")
    with pytest.raises(ValueError):
        ProtoNet(temperature=0)
    with pytest.raises(ValueError):
        ProtoNet().fit(np.zeros((2, 3)), np.array(["a"]))
