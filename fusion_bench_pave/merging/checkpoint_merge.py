"""Merge causal-LM safetensors checkpoints tensor by tensor into a sharded checkpoint.

The model's structure (state-dict names in module order, tied weights, which parameters are nn.Linear
weights) comes from its config, on the meta device; tensors are read lazily, merged by
``merging.stream`` and written by ``ShardWriter`` into an atomic output directory, with the
pretrained model's config and tokenizer files, that ``AutoModelForCausalLM.from_pretrained`` loads.
Under Lightning Fabric DDP the ranks write one checkpoint together (``io.shared_output``): output
shard ``i`` is merged and written by rank ``i % world_size``, and TIES's whole-model passes are
dealt by bytes (``ranks.balance``) with their counts summed, so the files are those of one process.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Container, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, PretrainedConfig

from fusion_bench_pave.io.atomic import refuse_replacing_dir
from fusion_bench_pave.io.shared_output import shared_atomic_output_dir
from fusion_bench_pave.causal_lm_skeleton import meta_causal_lm, stored_names
from fusion_bench_pave.merging.stream import (
    Dare,
    MergePlan,
    Share,
    TaskArithmetic,
    TaskVectorStream,
    TaskVectorTransform,
    Ties,
    merged_tensors,
)
from fusion_bench_pave.io.safetensors import LazyTensors, ShardWriter, copy_tokenizer_files
from fusion_bench_pave.ranks import balance, checked_sum, rank_and_size, raise_if_any_failed


def merge_plan(model: nn.Module, stored: Container[str], dare: Dare | None = None) -> MergePlan:
    """The plan of a merge of ``model``'s architecture from checkpoints holding the names ``stored``:
    DARE's tensors first, in the order FusionBench draws their masks (every parameter in
    ``named_parameters`` order, or each nn.Linear's weight in ``named_modules`` order), then the rest
    in state-dict order."""
    if buffers := [name for name, _ in model.named_buffers() if name in model.state_dict()]:
        raise ValueError(f"persistent buffers ({', '.join(buffers[:5])}) are not task-vector entries in "
                         "FusionBench's merges; this architecture is not supported")
    names = stored_names(model, stored)
    drawn: list[str] = []
    if dare is not None and dare.only_on_linear_weights:
        drawn = [names[f"{name}.weight"] for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    elif dare is not None:
        drawn = [names[name] for name, _ in model.named_parameters()]
    if len(set(drawn)) != len(drawn):
        repeated = [name for name, count in Counter(drawn).items() if count > 1]
        raise ValueError(f"{', '.join(repeated)}: shared by several nn.Linear modules; DARE would drop from it twice")
    order = drawn + [name for name in dict.fromkeys(names.values()) if name not in set(drawn)]
    return MergePlan(tuple(order), Counter(names.values()), frozenset(drawn))


def open_causal_lm_checkpoints(pretrained_path: str | os.PathLike, finetuned_paths: Sequence[str | os.PathLike]
                               ) -> tuple[PretrainedConfig, LazyTensors, list[LazyTensors]]:
    """The pretrained config and lazy readers of every checkpoint (file headers only); ValueError if
    a fine-tuned model's type is not the pretrained one's."""
    config = AutoConfig.from_pretrained(pretrained_path)
    for path in finetuned_paths:
        if (model_type := AutoConfig.from_pretrained(path).model_type) != config.model_type:
            raise ValueError(f"{path}: model type {model_type!r}, the pretrained model's is {config.model_type!r}")
    return config, LazyTensors(pretrained_path), [LazyTensors(path) for path in finetuned_paths]


def write_merged_checkpoint(pretrained_path: str | os.PathLike, stream: TaskVectorStream, method: TaskArithmetic | Ties,
                            out_path: str | os.PathLike, *, max_shard_bytes: int = 2 * 2**30, overwrite: bool = False,
                            progress: bool = True, fabric: Any | None = None) -> Path:
    """Write the merge of ``stream`` into ``out_path`` (atomically, sharded) with the pretrained model's
    config and tokenizer files. With a ``fabric`` of several processes, call it on every rank (same
    arguments; ``out_path`` on a filesystem they share): a failure on any rank fails every rank and
    leaves ``out_path`` untouched."""
    pretrained_path = Path(pretrained_path)
    rank, world_size = rank_and_size(fabric)
    sizes = {name: shape.numel() * dtype.itemsize for name, (shape, dtype) in stream.specs.items()}
    owner = balance(sizes, world_size)
    share = Share(lambda name: owner[name] == rank, lambda compute, what: checked_sum(fabric, compute, what))
    with shared_atomic_output_dir(out_path, overwrite, fabric) as staging:
        error = None
        try:
            writer = ShardWriter(staging, max_shard_bytes, rank, world_size)

            def claim(name: str) -> bool:  # this rank merges the tensors of its output shards
                return writer.claim({name: sizes[name]})

            for name, tensor in merged_tensors(stream, method, progress, take=claim, share=share):
                writer.write(name, tensor)
            writer.close()
            if rank == 0:
                shutil.copy2(pretrained_path / "config.json", staging / "config.json")
                copy_tokenizer_files(pretrained_path, staging)
        except Exception as caught:  # noqa: BLE001 (every rank learns of it below)
            error = caught
        raise_if_any_failed(fabric, error, "the merge")
    return Path(out_path)


def merge_causal_lm_checkpoints(
    pretrained_path: str | os.PathLike,
    finetuned_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    method: TaskArithmetic | Ties,
    *,
    dare: Dare | None = None,
    transform: TaskVectorTransform | None = None,
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
    fabric: Any | None = None,
) -> Path:
    """Merge the fine-tuned checkpoints into ``out_path`` (written atomically; an existing directory is
    replaced only with ``overwrite`` and only if we wrote it) with ``method``, after DARE's drop if
    ``dare`` and ``transform`` of each tensor's task vectors if given. Validates every checkpoint's
    tensor names, shapes and dtypes (file headers) before reading any weight. ``fabric``: the ranks
    of a DDP run share the work (``write_merged_checkpoint``)."""
    refuse_replacing_dir(out_path, overwrite)
    config, pretrained, finetuned = open_causal_lm_checkpoints(pretrained_path, finetuned_paths)
    stream = TaskVectorStream(pretrained, finetuned, merge_plan(meta_causal_lm(config), pretrained, dare), dare, transform,
                              labels=[str(path) for path in finetuned_paths])
    return write_merged_checkpoint(pretrained_path, stream, method, out_path, max_shard_bytes=max_shard_bytes,
                                   overwrite=overwrite, progress=progress, fabric=fabric)
