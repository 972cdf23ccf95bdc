"""Plots and tables for the flow's Metaflow cards; everything renders offline (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from metaflow.cards import Image, Markdown, Table  # noqa: E402


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_table(trials: Sequence[Mapping[str, Any]]) -> Table:
    """One row per trial: round, parameters, validation metrics, status and error."""
    param_names = sorted({name for t in trials for name in t.get("params", {})})
    header = ["trial", "round", *param_names, "val acc", "val RMSE", "val MAE", "epochs", "status", "error"]
    rows = []
    for t in trials:
        params = t.get("params", {})
        rows.append([
            _fmt(t.get("trial_id")), _fmt(t.get("round")), *[_fmt(params.get(p, "")) for p in param_names],
            _fmt(t.get("val_accuracy", "")), _fmt(t.get("val_rmse", "")), _fmt(t.get("val_mae", "")),
            _fmt(t.get("epochs_trained", "")), t.get("status", ""), (t.get("error") or "")[:200],
        ])
    return Table(rows, headers=header)


def learning_curves(trials: Sequence[Mapping[str, Any]]) -> Figure:
    """Validation accuracy and training loss per epoch, one line per trial."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.5))
    for t in trials:
        history = t.get("history") or []
        if not history:
            continue
        epochs = [h["epoch"] for h in history]
        label = f"trial {t.get('trial_id')}"
        ax_acc.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label=label)
        ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    if ax_acc.lines:
        ax_acc.legend(fontsize="small")
    fig.tight_layout()
    return fig


def confusion_matrix_figure(matrix: Sequence[Sequence[int]], counts: Sequence[int]) -> Figure:
    """A labelled heat map of a confusion matrix (rows: true count, columns: predicted)."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(counts)), yticks=range(len(counts)), xticklabels=counts, yticklabels=counts,
           xlabel="predicted count", ylabel="true count", title="Confusion matrix (test)")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > peak / 2 else "black", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_figure(before: Mapping[str, Sequence[float]], after: Mapping[str, Sequence[float]],
                       ece_before: float, ece_after: float) -> Figure:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect")
    ax.plot(before["confidence"], before["accuracy"], marker="o", label=f"before (ECE {ece_before:.3f})")
    ax.plot(after["confidence"], after["accuracy"], marker="o", label=f"after (ECE {ece_after:.3f})")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability (validation)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def metrics_table(metrics: Mapping[str, Any]) -> Table:
    """Scalar metrics as a two-column table."""
    rows = [[name, _fmt(value)] for name, value in metrics.items() if isinstance(value, (int, float))]
    return Table(rows, headers=["metric", "value"])


def records_table(records: Sequence[Mapping[str, Any]], columns: Sequence[str], limit: int = 50) -> Table:
    """The first `limit` records (dicts) as a table with the given columns."""
    rows = [[_fmt(r.get(c, "")) for c in columns] for r in records[:limit]]
    return Table(rows, headers=list(columns))


def figure(fig: Figure) -> Image:
    """A matplotlib figure as a card image (the figure is closed afterwards)."""
    image = Image.from_matplotlib(fig)
    plt.close(fig)
    return image


def heading(text: str) -> Markdown:
    """A section heading."""
    return Markdown(f"## {text}")
