"""Model pools that repair FusionBench 0.2.33 defects we depend on."""

from fusion_bench_pave.modelpool.seq2seq import Seq2SeqLMPool

__all__ = ["Seq2SeqLMPool"]
