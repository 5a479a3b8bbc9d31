"""Task pools for evaluating merged models on the tiny and offline zoos."""

from fusion_bench_pave.taskpool.clip_taskpool import CLIPVisionTaskPool
from fusion_bench_pave.taskpool.label_words_taskpool import LabelWordsTaskPool

__all__ = ["CLIPVisionTaskPool", "LabelWordsTaskPool"]
