"""The metrics the field reports, through torchmetrics: accuracy, balanced accuracy (ISIC 2018's
official metric, the mean per-class recall), macro precision/recall/F1, one-vs-rest ROC-AUC
(macro and per class), per-class sensitivity and specificity, the confusion matrix and ROC
curves. Synchronised over DDP ranks by torchmetrics itself when a process group is up.
"""

from __future__ import annotations

import math

import torch


def make(num_classes: int, device: torch.device, curves: bool = False):
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassAUROC,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
        MulticlassROC,
        MulticlassSpecificity,
    )

    per = dict(num_classes=num_classes)
    metrics = {
        "accuracy": MulticlassAccuracy(average="micro", **per),
        "balanced_accuracy": MulticlassAccuracy(average="macro", **per),
        "precision": MulticlassPrecision(average="macro", **per),
        "recall": MulticlassRecall(average="macro", **per),
        "f1": MulticlassF1Score(average="macro", **per),
        "class_precision": MulticlassPrecision(average="none", **per),
        "class_recall": MulticlassRecall(average="none", **per),
        "class_specificity": MulticlassSpecificity(average="none", **per),
        "class_f1": MulticlassF1Score(average="none", **per),
        "confusion": MulticlassConfusionMatrix(**per),
    }
    if num_classes > 1:
        metrics["class_auc"] = MulticlassAUROC(average="none", **per)
    if curves and num_classes > 1:
        metrics["roc"] = MulticlassROC(**per)
    return MetricCollection(metrics).to(device)


def run_over(model, loader, num_classes: int, device: torch.device, autocast: dict,
             memory_format=torch.contiguous_format, keep: bool = False, curves: bool = False):
    """The metrics (``make``) updated with ``model``'s class probabilities on every batch of
    ``loader``, the summed cross-entropy and the number of samples (this process's share). With
    ``keep``, also every image's probabilities (float32, CPU) in loader order. No gradients."""
    m = make(num_classes, device, curves)
    loss_sum, seen, kept = 0.0, 0, []
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with torch.autocast(**autocast):
                logits = model(x).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            seen += len(y)
            probs = logits.softmax(1)
            m.update(probs, y)
            if keep:
                kept.append(probs.cpu())
    if keep:
        return m, loss_sum, seen, torch.cat(kept) if kept else torch.zeros(0, num_classes)
    return m, loss_sum, seen


def result(metrics, classes: list[str]) -> dict:
    """Plain numbers: overall metrics, a per-class table and the confusion matrix (rows: true;
    ``confusion_normalized``: each row divided by its count). A class's AUC needs images of it
    and of others: without them it is None and left out of the macro AUC."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(no positive|no negative|samples in target).*")
        values = metrics.compute()
    roc = values.pop("roc", None)
    values = {k: v.cpu() for k, v in values.items()}
    confusion = values["confusion"].long()
    support = confusion.sum(1)
    total = int(confusion.sum())
    # one-vs-rest AUC exists where the class has both positives and negatives
    auc = [float(values["class_auc"][i]) if "class_auc" in values and 0 < int(support[i]) < total else None
           for i in range(len(classes))]
    valid = [a for a in auc if a is not None]
    res = {
        "images": total,
        "accuracy": float(values["accuracy"]),
        "balanced_accuracy": float(values["balanced_accuracy"]),
        "precision": float(values["precision"]),
        "recall": float(values["recall"]),
        "f1": float(values["f1"]),
        "auc": sum(valid) / len(valid) if valid else None,
        "per_class": {
            name: {
                "precision": float(values["class_precision"][i]),
                "recall": float(values["class_recall"][i]),
                "sensitivity": float(values["class_recall"][i]),
                "specificity": float(values["class_specificity"][i]),
                "f1": float(values["class_f1"][i]),
                "auc": auc[i],
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion": confusion.tolist(),
        "confusion_normalized": [[round(c / max(1, int(support[i])), 6) for c in row] for i, row in enumerate(confusion.tolist())],
    }
    if roc is not None:
        fpr, tpr, _ = roc
        res["_roc"] = [(f.cpu(), t.cpu()) if a is not None else None for f, t, a in zip(fpr, tpr, auc)]
    return res


def selection_score(res: dict, select: str) -> float:
    """The validation number --select ranks checkpoints by (an unmeasurable AUC ranks lowest)."""
    value = res[{"acc": "accuracy", "balanced_acc": "balanced_accuracy"}.get(select, select)]
    return -math.inf if value is None else value


def _wrap(title: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(title, width))


def _fmt(v, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}.4f}"


def table(res: dict) -> str:
    """Overall and per-class metrics as a text table."""
    width = max([len("macro"), *(len(c) for c in res["per_class"])])
    lines = [f"{'class':<{width}}  precision  recall/sens  specificity      f1     auc  support"]
    for name, m in res["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:9.4f}  {m['recall']:11.4f}  {m['specificity']:11.4f}  "
                     f"{m['f1']:6.4f}  {_fmt(m['auc'], 6)}  {m['support']:7d}")
    lines.append(f"{'macro':<{width}}  {res['precision']:9.4f}  {res['recall']:11.4f}  {'':11}  {res['f1']:6.4f}  "
                 f"{_fmt(res['auc'], 6)}  {res['images']:7d}")
    lines.append(f"accuracy {res['accuracy']:.4f}, balanced accuracy {res['balanced_accuracy']:.4f} on {res['images']} images")
    return "\n".join(lines)


def confusion_png(res: dict, path, title: str) -> None:
    """The counts and the row-normalised matrix side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(res["per_class"])
    n = len(classes)
    side = 1.5 + 0.6 * n
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side + 1.2), dpi=100)
    for ax, matrix, name, fmt in ((axes[0], res["confusion"], "counts", "{:d}"),
                                  (axes[1], res["confusion_normalized"], "row-normalised (recall on the diagonal)", "{:.2f}")):
        ax.imshow(matrix, cmap="Blues", vmin=0)
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=10)
        top = max(max(row) for row in matrix) or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, fmt.format(matrix[i][j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i][j] > top / 2 else "black")
    fig.suptitle(_wrap(title, 110), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def roc_png(res: dict, path, title: str) -> bool:
    """One-vs-rest ROC curves of every class that has them; False where none has."""
    curves = res.get("_roc")
    if not curves or all(c is None for c in curves):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=100)
    for (name, m), curve in zip(res["per_class"].items(), curves):
        if curve is not None:
            ax.plot(curve[0].numpy(), curve[1].numpy(), label=f"{name} (AUC {m['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(_wrap(title, 80), fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
