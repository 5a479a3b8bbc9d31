"""Task pools for evaluating merged models on the tiny and offline zoos."""

from fusion_bench_pave import plugin  # noqa: F401  (compat repair before fusion_bench imports)

from fusion_bench_pave.taskpool.classification_heads_taskpool import ClassificationHeadsTaskPool
from fusion_bench_pave.taskpool.clip_taskpool import CLIPVisionTaskPool
from fusion_bench_pave.taskpool.label_words_taskpool import LabelWordsTaskPool
from fusion_bench_pave.taskpool.openclip_taskpool import OpenCLIPVisionTaskPool
from fusion_bench_pave.taskpool.sentence_encoder_taskpool import SentenceEncoderTaskPool

__all__ = ["ClassificationHeadsTaskPool", "CLIPVisionTaskPool", "LabelWordsTaskPool", "OpenCLIPVisionTaskPool", "SentenceEncoderTaskPool"]
