"""ELMES label encoding (CAML): an Equal-Length, Maximally Equiangular Set of class vectors.

The C vectors are the vertices of a regular simplex centred at the origin (a simplex equiangular
tight frame): unit length, pairwise cosine exactly −1/(C−1), the most separated a set of C
equal-length vectors can be. They are embedded in ``dim`` dimensions by a seeded random orthonormal
basis, so the encoding is fixed (never trained) and reproducible.
"""

from __future__ import annotations

import numpy as np


def elmes(num_classes: int, dim: int, seed: int = 0) -> np.ndarray:
    """float32 [num_classes, dim] unit vectors with pairwise cosine −1/(num_classes−1)."""
    if num_classes < 2:
        raise ValueError(f"ELMES needs at least 2 classes, got {num_classes}")
    if dim < num_classes:
        raise ValueError(f"ELMES needs dim >= num_classes ({dim} < {num_classes})")
    c = num_classes
    # Centred identity, scaled so each row has unit norm: rows of sqrt(C/(C-1)) (I - 11^T/C).
    centred = np.sqrt(c / (c - 1)) * (np.eye(c) - np.full((c, c), 1.0 / c))
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, c)))  # dim x C, orthonormal columns
    return (centred @ basis.T).astype(np.float32)
