"""Input statistics of a causal LM's Linears with one decoder layer in memory at a time.

The calibration batches go through the embedding once; one forward of the weightless model (every
decoder layer replaced by a recorder, see ``_LayerArguments``) records what the installed transformers
passes each layer: causal / sliding-window / padding masks, rotary embeddings, position ids. Then each
decoder layer in turn takes its weights from the checkpoint, runs every batch's hidden states with its
recorded arguments under a ``CovarianceCollector`` and is released; the final norm and ``lm_head``
come last. The sums are those of ``collect_covariance`` on the whole model (same names, same layer
inputs), while memory holds one layer, the hidden states of the calibration tokens, and that layer's
statistics (``iter_causal_lm_covariance`` hands them over layer by layer).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from fusion_bench_pave.causal_lm_skeleton import load_module_, meta_causal_lm, release_module_, stored_names
from fusion_bench_pave.pave.covariance import CovarianceCollector, CovarianceStats, LinearFilter
from fusion_bench_pave.io.safetensors import LazyTensors


class _LayerArguments(nn.Module):
    """Stands in for one decoder layer during a forward of the model: records the arguments the model
    passes it (everything but the hidden states) and returns the hidden states unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple, dict[str, Any]]] = []

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.calls.append((args, kwargs))
        return hidden_states


@dataclass
class _Batch:
    hidden: Tensor  # input of the next layer to run
    mask: Optional[Tensor]  # tokens to count
    arguments: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)  # per decoder layer


def _calibration_tokens(mask: Optional[Tensor], inputs: Mapping[str, Tensor]) -> int:
    """Rows every Linear of a decoder LM receives from this batch (all its counted tokens)."""
    return int(mask.sum()) if mask is not None else inputs["input_ids"].numel()


def _embedded_batches(model: nn.Module, checkpoint: Mapping[str, Tensor], names: Mapping[str, str],
                      batches: Iterable[tuple[dict, Optional[Tensor]]], max_rows: Optional[int],
                      model_dtype: Optional[torch.dtype], device: torch.device) -> list[_Batch]:
    """Embed the batches (those ``collect_covariance`` would use under ``max_rows``) and record every
    decoder layer's arguments, with the model's own forward over recorders in place of its layers."""
    base = model.get_submodule(model.base_model_prefix)
    prefix = model.base_model_prefix + "."
    layers, norm, rotary = base.layers, base.norm, base.rotary_emb
    recorders = nn.ModuleList(_LayerArguments() for _ in layers)
    load_module_(base.embed_tokens, prefix + "embed_tokens.", checkpoint, names, model_dtype, device)
    base.layers, base.norm, base.rotary_emb = recorders, nn.Identity(), type(rotary)(config=model.config).to(device)
    out, rows = [], 0
    try:
        for inputs, mask in batches:
            inputs = {key: value.to(device) for key, value in inputs.items()}
            hidden = base(**inputs, use_cache=False).last_hidden_state
            out.append(_Batch(hidden, None if mask is None else mask.to(device),
                              [recorder.calls.pop() for recorder in recorders]))
            rows += _calibration_tokens(mask, inputs)
            if max_rows is not None and rows >= max_rows:
                break
    finally:
        release_module_(base.embed_tokens)
        base.layers, base.norm, base.rotary_emb = layers, norm, rotary
    return out


@torch.no_grad()
def iter_causal_lm_covariance(
    checkpoint: Mapping[str, Tensor] | str | os.PathLike,
    batches: Iterable[tuple[dict, Optional[Tensor]]],
    config: Optional[PretrainedConfig] = None,
    include: Optional[LinearFilter] = None,
    dtype: torch.dtype = torch.float64,
    max_rows: Optional[int] = None,
    model_dtype: Optional[torch.dtype] = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Iterator[tuple[str, CovarianceStats]]:
    """Yield (module name, statistics of the Linears under it) for each decoder layer, then ``lm_head``.

    ``checkpoint`` is a Hugging Face model directory (safetensors, sharded or not; ``config`` read from
    it) or a ``name -> tensor`` mapping with its ``config``. ``batches``, ``include``, ``dtype`` and
    ``max_rows`` are those of ``collect_covariance`` (model kwargs with ``input_ids``, token masks);
    weights are used in ``model_dtype`` (None: as stored) on ``device``.
    """
    if not isinstance(checkpoint, Mapping):
        config = config or AutoConfig.from_pretrained(checkpoint)
        checkpoint = LazyTensors(checkpoint)
    if config is None:
        raise ValueError("a checkpoint given as a mapping of tensors needs its config")
    device = torch.device(device)
    model = meta_causal_lm(config)
    names = stored_names(model, checkpoint)
    records = _embedded_batches(model, checkpoint, names, batches, max_rows, model_dtype, device)
    if not records:
        raise ValueError("no calibration batches: the statistics need at least one")
    base = model.get_submodule(model.base_model_prefix)

    def collect(module: nn.Module, prefix: str, forward) -> CovarianceStats:
        load_module_(module, prefix, checkpoint, names, model_dtype, device)
        try:
            with CovarianceCollector(model, include, dtype, max_rows) as collector:
                for record in records:
                    collector.set_token_mask(record.mask)
                    forward(record)
        finally:
            release_module_(module)
        return collector.stats

    for i, layer in enumerate(tqdm(base.layers, desc="statistics, layer by layer", disable=not progress)):
        def run_layer(record: _Batch, layer=layer, i=i) -> None:
            args, kwargs = record.arguments[i]
            record.hidden = layer(record.hidden, *args, **kwargs)

        prefix = f"{model.base_model_prefix}.layers.{i}"
        yield prefix, collect(layer, prefix + ".", run_layer)
    head = model.get_output_embeddings()
    head_name = next(name for name, module in model.named_modules() if module is head)
    if isinstance(head, nn.Linear) and (include is None or include(head_name, head)):
        load_module_(base.norm, f"{model.base_model_prefix}.norm.", checkpoint, names, model_dtype, device)
        try:
            yield head_name, collect(head, head_name + ".", lambda record: head(base.norm(record.hidden)))
        finally:
            release_module_(base.norm)


def collect_causal_lm_covariance(
    checkpoint: Mapping[str, Tensor] | str | os.PathLike,
    batches: Iterable[tuple[dict, Optional[Tensor]]],
    **kwargs: Any,
) -> CovarianceStats:
    """All of ``iter_causal_lm_covariance`` in one ``CovarianceStats`` (as ``collect_covariance`` on the
    whole model returns it); the same arguments."""
    stats = CovarianceStats()
    for _, part in iter_causal_lm_covariance(checkpoint, batches, **kwargs):
        stats.xtx |= part.xtx
        stats.count |= part.count
        stats.input_of |= part.input_of
    return stats
