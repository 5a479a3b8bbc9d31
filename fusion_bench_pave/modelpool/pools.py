"""FusionBench's model pools with checked loading (clear errors for missing or corrupt
checkpoints) and atomic, non-clobbering saving of the merged model."""

from __future__ import annotations

from fusion_bench.modelpool import CausalLMPool as _CausalLMPool
from fusion_bench.modelpool import CLIPVisionModelPool as _CLIPVisionModelPool
from fusion_bench.modelpool import SequenceClassificationModelPool as _SequenceClassificationModelPool

from fusion_bench_pave.modelpool.atomic_save import AtomicSaveMixin
from fusion_bench_pave.modelpool.checked_load import CheckedLoadMixin


class CLIPVisionModelPool(CheckedLoadMixin, AtomicSaveMixin, _CLIPVisionModelPool):
    """FusionBench's CLIPVisionModelPool, checked loading, atomic saving."""


class CausalLMPool(CheckedLoadMixin, AtomicSaveMixin, _CausalLMPool):
    """FusionBench's CausalLMPool, checked loading, atomic saving."""


class SequenceClassificationModelPool(CheckedLoadMixin, AtomicSaveMixin, _SequenceClassificationModelPool):
    """FusionBench's SequenceClassificationModelPool, checked loading, atomic saving."""
