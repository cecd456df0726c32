"""An episode's figures: the ROC curve and confusion matrix, and the anomaly-map gallery's scales and captions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from fewshot_core.figures import episode
from fewshot_core.figures.gallery import anomaly_gallery, caption, map_scale


def test_roc_and_confusion_pngs():
    assert episode.roc_curve_png([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]).startswith(b"\x89PNG")
    assert episode.confusion_matrix_png([[3, 1], [0, 4]], ["good", "bad"]).startswith(b"\x89PNG")


def test_gallery_maps_have_their_own_scale_with_the_threshold_and_say_the_decision():
    defect = np.linspace(0.0, 10.0, 64).reshape(8, 8)
    false_alarm = np.linspace(0.0, 3.0, 64).reshape(8, 8)  # above t=2.5, far below the defect's peak
    clean = np.linspace(0.0, 1.0, 64).reshape(8, 8)
    # a shared 0..10 scale showed the false alarm's peak at 30 % of the colour range; its own scale tops out
    assert map_scale(false_alarm, 2.5) == (0.0, 3.0)
    assert map_scale(clean, 2.5) == (0.0, 2.5)  # a clean map never reaches the top colour
    assert map_scale(defect, None) == (0.0, 10.0)
    assert caption("good", 0, 3.0, 2.5) == "good: false alarm\ns=3.00 > t=2.50"
    assert caption("crack", 1, 2.0, 2.5) == "crack: missed\ns=2.00 ≤ t=2.50"
    assert caption("crack", 1, 2.0, None) == "crack\ns=2.00"
    items = [{"image": np.zeros((8, 8, 3), np.uint8), "map": m, "caption": "x"} for m in (defect, false_alarm, clean)]
    assert anomaly_gallery(items, "t", threshold=2.5).startswith(b"\x89PNG")


def test_an_episodes_figures_load_neither_the_report_nor_its_dependencies():
    # an evaluation worker draws these for every episode; the report pulls in pandas, pyarrow and tracking
    code = ("import sys; import fewshot_core.figures.episode, fewshot_core.figures.gallery; "
            "print(sorted(m for m in sys.modules if m.startswith(('fewshot_core.reports', 'fewshot_core.tracking', 'pandas'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
