"""The paper's classification metrics through torchmetrics: accuracy, macro precision, recall
and F1, the same per class, and the confusion matrix. Synchronised over DDP ranks by
torchmetrics itself when a process group is up."""

from __future__ import annotations

import torch


def make(num_classes: int, device: torch.device):
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    per = dict(num_classes=num_classes)
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(average="micro", **per),
            "precision": MulticlassPrecision(average="macro", **per),
            "recall": MulticlassRecall(average="macro", **per),
            "f1": MulticlassF1Score(average="macro", **per),
            "class_precision": MulticlassPrecision(average="none", **per),
            "class_recall": MulticlassRecall(average="none", **per),
            "class_f1": MulticlassF1Score(average="none", **per),
            "confusion": MulticlassConfusionMatrix(**per),
        }
    ).to(device)


def run_over(model, loader, num_classes: int, device: torch.device, autocast: dict,
             memory_format=torch.contiguous_format):
    """The metrics (``make``) updated with ``model``'s logits on every batch of ``loader``, and
    the summed cross-entropy and the number of samples (this process's share). No gradients."""
    m = make(num_classes, device)
    loss_sum, seen = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with torch.autocast(**autocast):
                logits = model(x).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            seen += len(y)
            m.update(logits, y)
    return m, loss_sum, seen


def result(metrics, classes: list[str]) -> dict:
    """Plain numbers: overall metrics, a per-class table and the confusion matrix (rows: true)."""
    values = {k: v.cpu() for k, v in metrics.compute().items()}
    confusion = values["confusion"].long()
    return {
        "images": int(confusion.sum()),
        "accuracy": float(values["accuracy"]),
        "precision": float(values["precision"]),
        "recall": float(values["recall"]),
        "f1": float(values["f1"]),
        "per_class": {
            name: {
                "precision": float(values["class_precision"][i]),
                "recall": float(values["class_recall"][i]),
                "f1": float(values["class_f1"][i]),
                "support": int(confusion[i].sum()),
            }
            for i, name in enumerate(classes)
        },
        "confusion": confusion.tolist(),
    }


def table(res: dict) -> str:
    """Overall and per-class metrics as a text table."""
    width = max([len("macro"), *(len(c) for c in res["per_class"])])
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    for name, m in res["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {m['support']:7d}")
    lines.append(f"{'macro':<{width}}  {res['precision']:9.4f}  {res['recall']:6.4f}  {res['f1']:6.4f}  {res['images']:7d}")
    lines.append(f"accuracy {res['accuracy']:.4f} on {res['images']} images")
    return "\n".join(lines)


def confusion_png(res: dict, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(res["per_class"])
    matrix = res["confusion"]
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", color="white" if matrix[i][j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
