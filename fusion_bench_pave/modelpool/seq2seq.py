"""FusionBench's Seq2SeqLMPool with a working ``load_tokenizer``, checked loading and atomic HF-format saving."""

from __future__ import annotations

from omegaconf import DictConfig

from fusion_bench.modelpool import Seq2SeqLMPool as _FusionBenchSeq2SeqLMPool
from fusion_bench.utils import instantiate

from fusion_bench_pave.modelpool.atomic_save import AtomicSaveMixin
from fusion_bench_pave.modelpool.checked_load import CheckedLoadMixin


class _RepairedSeq2SeqLMPool(_FusionBenchSeq2SeqLMPool):
    """In fusion_bench 0.2.33 ``load_tokenizer`` returns ``isinstance(...)`` (a bool) and
    ``save_model`` writes a bare state dict that ``from_pretrained`` cannot read."""

    def load_tokenizer(self, *args, **kwargs):
        if self._tokenizer is None:
            raise ValueError("this model pool has no `tokenizer` configured")
        if isinstance(self._tokenizer, str):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self._tokenizer, *args, **kwargs)
        if isinstance(self._tokenizer, (dict, DictConfig)):
            return instantiate(self._tokenizer, *args, **kwargs)
        return self._tokenizer

    def save_model(self, model, path: str, **kwargs) -> None:
        model.save_pretrained(path)


class Seq2SeqLMPool(CheckedLoadMixin, AtomicSaveMixin, _RepairedSeq2SeqLMPool):
    """The repaired pool, with checked loading and atomic, non-clobbering saving."""
