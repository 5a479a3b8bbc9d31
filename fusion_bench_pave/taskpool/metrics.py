"""GLUE's metrics over whole prediction vectors, in float64 torch: accuracy, F1 (MRPC and QQP, beside
accuracy), Matthews correlation (CoLA), Pearson and Spearman correlation (STS-B's regression head)."""

from __future__ import annotations

import torch
from torch import Tensor


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Fraction of predicted class ids equal to the labels."""
    return (predictions == labels).double().mean().item()


def f1(predictions: Tensor, labels: Tensor) -> float:
    """F1 score of class 1 (GLUE's positive class: paraphrase, duplicate); 0 when there is no true or
    predicted positive, as scikit-learn defines it."""
    true_positive = ((predictions == 1) & (labels == 1)).sum().double()
    denominator = (predictions == 1).sum() + (labels == 1).sum()
    return 0.0 if denominator == 0 else (2 * true_positive / denominator).item()


def matthews_correlation(predictions: Tensor, labels: Tensor) -> float:
    """Matthews correlation of class ids (the multi-class R_K form, = the phi coefficient for two
    classes); 0 when either side has a single class, as scikit-learn defines it."""
    classes = int(torch.cat([predictions, labels]).max()) + 1
    confusion = torch.zeros(classes, classes, dtype=torch.float64)
    confusion.index_put_((labels.long(), predictions.long()), torch.ones(len(labels), dtype=torch.float64),
                         accumulate=True)
    true, predicted = confusion.sum(1), confusion.sum(0)
    n, correct = confusion.sum(), confusion.trace()
    denominator = ((n**2 - predicted @ predicted) * (n**2 - true @ true)).sqrt()
    return 0.0 if denominator == 0 else ((correct * n - predicted @ true) / denominator).item()


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation coefficient of two equally long vectors."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return (x @ y / (x.norm() * y.norm())).item()


def ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of the entries of x, ties given their average rank."""
    order = x.double().argsort()
    sorted_x = x.double()[order]
    first = torch.searchsorted(sorted_x, sorted_x, side="left")
    last = torch.searchsorted(sorted_x, sorted_x, side="right")
    out = torch.empty(len(x), dtype=torch.float64)
    out[order] = (first + last + 1).double() / 2
    return out


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    return pearson(ranks(x), ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation, "pearson": pearson,
           "spearman": spearman}
