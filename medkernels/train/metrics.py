"""The papers' classification metrics, computed with scikit-learn.

Macro averages are taken over the classes present in the labels: a class absent from a split has no
sensitivity and no one-vs-rest AUC, so it is reported as null (with a note) rather than counted as 0.
"""
import numpy as np


def _float(value):
    return None if value is None else float(value)


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _specificity(cm):
    """TN / (TN + FP) per class from confusion matrix `cm` (rows: true, columns: predicted); None when
    the class has no negatives."""
    total = cm.sum()
    out = []
    for c in range(cm.shape[0]):
        fp = cm[:, c].sum() - cm[c, c]
        negatives = total - cm[c, :].sum()
        out.append(None if negatives == 0 else (negatives - fp) / negatives)
    return out


def _per_class_auc(labels, probs, present):
    from sklearn.metrics import roc_auc_score

    aucs = []
    for c in range(probs.shape[1]):
        is_c = labels == c
        aucs.append(roc_auc_score(is_c, probs[:, c]) if present[c] and not is_c.all() else None)
    return aucs


def _macro_auc(labels, probs, present, class_names, notes):
    from sklearn.metrics import roc_auc_score

    if not all(present):
        absent = [name for name, p in zip(class_names, present) if not p]
        notes.append(f"macro AUC undefined: class(es) {', '.join(absent)} absent from the labels")
        return None
    if len(class_names) == 2:
        return roc_auc_score(labels, probs[:, 1])
    return roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(len(class_names))))


def compute_metrics(labels, probs, class_names):
    """Accuracy and per-class / macro precision, sensitivity, specificity, F1 and one-vs-rest AUC.

    labels: (n,) true class indices; probs: (n, C) class probabilities (rows summing to 1);
    class_names: C names. Returns a JSON-ready dict: ``accuracy``, ``macro`` (precision, sensitivity,
    specificity, f1, auc), ``per_class`` (one dict per class, with ``support``), ``confusion_matrix``
    (rows: true class, columns: predicted), ``num_samples`` and ``notes``. Undefined figures are None.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    if probs.ndim != 2 or probs.shape != (len(labels), num_classes):
        raise ValueError(f"probs must have shape ({len(labels)}, {num_classes}), got {probs.shape}")
    preds = probs.argmax(axis=1)
    indices = list(range(num_classes))
    cm = confusion_matrix(labels, preds, labels=indices)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=indices, average=None, zero_division=0)
    present = support > 0
    specificity = _specificity(cm)
    aucs = _per_class_auc(labels, probs, present)
    notes = []
    absent = [name for name, p in zip(class_names, present) if not p]
    if absent:
        notes.append(f"class(es) {', '.join(absent)} absent from the labels: their sensitivity, F1 and AUC are "
                     "null and the macro averages are over the other classes")
    per_class = []
    for c, name in enumerate(class_names):
        per_class.append({
            "class": name,
            "precision": float(precision[c]),
            "sensitivity": float(recall[c]) if present[c] else None,
            "specificity": _float(specificity[c]),
            "f1": float(f1[c]) if present[c] else None,
            "auc": _float(aucs[c]),
            "support": int(support[c]),
        })
    kept = [row for row, p in zip(per_class, present) if p]
    macro = {key: _mean(row[key] for row in kept) for key in ("precision", "sensitivity", "specificity", "f1")}
    macro["auc"] = _float(_macro_auc(labels, probs, present, class_names, notes))
    return {
        "num_samples": int(len(labels)),
        "classes": list(class_names),
        "accuracy": float(accuracy_score(labels, preds)),
        "macro": macro,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "notes": notes,
    }


def roc_curves(labels, probs):
    """{class index: (fpr, tpr)} one-vs-rest, for the classes with both positives and negatives."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels)
    curves = {}
    for c in range(probs.shape[1]):
        is_c = labels == c
        if is_c.any() and not is_c.all():
            fpr, tpr, _ = roc_curve(is_c, probs[:, c])
            curves[c] = (fpr, tpr)
    return curves


def _cell(value):
    return "   n/a" if value is None else f"{value:6.3f}"


def format_report(metrics):
    """The per-class table and the overall figures, as printable text."""
    width = max(12, *(len(name) for name in metrics["classes"]))
    head = f"{'class':<{width}}  precision  sensitivity  specificity      F1     AUC  support"
    lines = [head, "-" * len(head)]
    for row in metrics["per_class"]:
        lines.append(f"{row['class']:<{width}}  {_cell(row['precision']):>9}  {_cell(row['sensitivity']):>11}  "
                     f"{_cell(row['specificity']):>11}  {_cell(row['f1'])}  {_cell(row['auc'])}  {row['support']:>7}")
    m = metrics["macro"]
    lines.append("-" * len(head))
    lines.append(f"{'macro':<{width}}  {_cell(m['precision']):>9}  {_cell(m['sensitivity']):>11}  "
                 f"{_cell(m['specificity']):>11}  {_cell(m['f1'])}  {_cell(m['auc'])}  {metrics['num_samples']:>7}")
    lines.append(f"accuracy: {metrics['accuracy']:.4f} on {metrics['num_samples']} images")
    lines += [f"note: {note}" for note in metrics["notes"]]
    return "\n".join(lines)
