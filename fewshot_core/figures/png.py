"""A matplotlib figure to PNG bytes (headless: the package sets the Agg backend)."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt


def to_png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
