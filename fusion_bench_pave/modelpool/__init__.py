"""Model pools that repair FusionBench 0.2.33 defects we depend on, name missing or corrupt
checkpoints clearly, and save merged models atomically."""

from fusion_bench_pave import plugin  # noqa: F401  (compat repair before fusion_bench imports)

from fusion_bench_pave.modelpool.atomic_save import AtomicSaveMixin
from fusion_bench_pave.modelpool.checked_load import CheckedLoadMixin
from fusion_bench_pave.modelpool.openclip import OpenCLIPVisionModelPool
from fusion_bench_pave.modelpool.pools import CausalLMPool, CLIPVisionModelPool, SequenceClassificationModelPool
from fusion_bench_pave.modelpool.seq2seq import Seq2SeqLMPool

__all__ = [
    "AtomicSaveMixin",
    "CausalLMPool",
    "CheckedLoadMixin",
    "CLIPVisionModelPool",
    "OpenCLIPVisionModelPool",
    "Seq2SeqLMPool",
    "SequenceClassificationModelPool",
]
