"""Model pools that repair FusionBench 0.2.33 defects we depend on and save merged models atomically."""

from fusion_bench_pave.modelpool.atomic_save import (
    AtomicSaveMixin,
    CausalLMPool,
    CLIPVisionModelPool,
    SequenceClassificationModelPool,
)
from fusion_bench_pave.modelpool.seq2seq import Seq2SeqLMPool

__all__ = ["AtomicSaveMixin", "CausalLMPool", "CLIPVisionModelPool", "Seq2SeqLMPool", "SequenceClassificationModelPool"]
