"""Which columns of a text dataset are the model's input: one text, or a GLUE-style sentence pair.

Shared by PAVE's calibration and the task pools, so a dataset that evaluates also calibrates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

TEXT_COLUMNS = ("text", "sentence", "content")
#: GLUE's pairs (MRPC/STS-B/RTE/WNLI, QQP, MNLI, QNLI), looked up before the single columns
TEXT_PAIRS = (("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
              ("question", "sentence"))


def text_columns(columns: Iterable[str]) -> Optional[tuple[str, ...]]:
    """The input columns among ``columns``: a pair of TEXT_PAIRS, else the first of TEXT_COLUMNS
    present; None if there is neither."""
    present = set(columns)
    for pair in TEXT_PAIRS:
        if present.issuperset(pair):
            return pair
    return next(((name,) for name in TEXT_COLUMNS if name in present), None)
