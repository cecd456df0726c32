"""An episode's curves: the ROC curve of a scoring protocol's episode, the confusion matrix of a supervised one."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from fewshot_core.figures.png import to_png


def roc_curve_png(labels, scores, title: str = "ROC") -> bytes:
    # deferred: sklearn loads pandas, which importing the figures must not (test_figures)
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(3.4, 3.4))
    ax.plot(fpr, tpr, label=f"AUROC {roc_auc_score(labels, scores):.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return to_png(fig)


def confusion_matrix_png(matrix, classes, title: str = "confusion matrix") -> bytes:
    cm = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1.0 + 0.6 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=8,
                color="w" if v > cm.max() / 2 else "k")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return to_png(fig)
