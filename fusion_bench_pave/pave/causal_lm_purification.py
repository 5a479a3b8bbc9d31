"""PAVE on causal-LM checkpoints, one decoder layer at a time, then a streamed merge.

Each task's statistics are collected layer by layer (``causal_lm_statistics``); as soon as a decoder
layer's statistics are in, its Linear weights are purified by the pure functions
(``purification.iter_purified``) and written into a scratch checkpoint of that task, and both are
released. The merge then streams the fine-tuned checkpoints with the purified weights laid over them
(``merging.views.Overlay``), so every merger of ``merging.stream`` runs unchanged.

Allocation: ``uniform`` ranks depend on one layer of one model, so the tasks are purified one after
another and memory holds one decoder layer of one model (plus its statistics and the calibration
tokens' hidden states); ``per_layer`` needs every model's spectrum of a layer, so the tasks' layer-by-
layer collections advance in lockstep (one decoder layer of each model); ``per_model`` needs every
layer's spectrum before any purification and is not offered here.

Under Lightning Fabric DDP each rank collects on its share of the calibration batches and each
layer's sums are all-reduced (as the in-memory PAVE's); the layer's Linears, in groups reading one
input, are dealt to the ranks by estimated cost and each rank writes its purified weights into its
own scratch checkpoint; the merge writes one checkpoint with all ranks (``checkpoint_merge``). Given
the same statistics the output is that of one process, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from fusion_bench_pave.causal_lm_skeleton import meta_causal_lm, stored_names
from fusion_bench_pave.io.atomic import refuse_replacing_dir
from fusion_bench_pave.io.safetensors import LazyTensors, ShardWriter
from fusion_bench_pave.io.shared_output import shared_temporary_dir
from fusion_bench_pave.merging.checkpoint_merge import merge_plan, open_causal_lm_checkpoints, write_merged_checkpoint
from fusion_bench_pave.merging.dare import task_generator_states
from fusion_bench_pave.merging.stream import Dare, TaskArithmetic, TaskVectorStream, Ties, plan_draws, tensor_spec
from fusion_bench_pave.merging.views import Combined, DaredWeights, Overlay
from fusion_bench_pave.pave.causal_lm_statistics import iter_causal_lm_covariance
from fusion_bench_pave.pave.covariance import CovarianceStats, LinearFilter
from fusion_bench_pave.pave.purification import PurifySettings, iter_purified, purifiable_layers
from fusion_bench_pave.ranks import balance, gather, raise_if_any_failed, rank_and_size

Batches = Iterable[tuple[dict, Optional[Tensor]]]
StatisticsCheck = Callable[[str, CovarianceStats], None]  # (task, one layer's statistics) -> raise if unusable
STREAMED_ALLOCATIONS = ("uniform", "per_layer")


@dataclass(frozen=True)
class StreamedCollection:
    """How the statistics are collected (``iter_causal_lm_covariance``'s arguments): which Linears,
    accumulation dtype, the official first-N-rows cap, the weights' dtype (None: as stored) and device."""

    include: Optional[LinearFilter] = None
    dtype: torch.dtype = torch.float64
    max_rows: Optional[int] = None
    model_dtype: Optional[torch.dtype] = None
    device: str | torch.device = "cpu"


# A shard writer holds its current shard in memory, so the scratch checkpoints use small shards: their
# buffers stay a few layers' purified weights at any depth instead of growing up to max_shard_bytes per task
SCRATCH_SHARD_BYTES = 2**28


@dataclass
class PurifiedCheckpoints:
    """Each purified task's purified Linear weights (scratch checkpoints, one per rank; weights kept
    at full rank are not in them), kept ranks {task: {layer: r}} and full ranks {layer: R}."""

    weights: dict[str, Combined]
    ranks: dict[str, dict[str, int]]
    full_ranks: dict[str, int]


def check_streamed_allocation(settings: PurifySettings) -> None:
    if settings.allocation not in STREAMED_ALLOCATIONS:
        raise ValueError(f"allocation={settings.allocation!r}: the streamed PAVE offers {list(STREAMED_ALLOCATIONS)} "
                         "(per_model needs every layer's spectrum before purifying any; use the in-memory PAVE)")


def _unit_costs(shapes: Mapping[str, torch.Size], stats: CovarianceStats) -> dict[str, float]:
    """Rough flops of purifying each group of Linears (``shapes``: layer -> weight shape) that read one
    input (q/k/v, gate/up: its regularisation is shared), keyed by the input: C_eps, and per Linear
    W C_eps and the Gram's eigh."""
    costs: dict[str, float] = {}
    for layer, (out_features, in_features) in shapes.items():
        key = stats.input_of[layer]
        costs[key] = costs.get(key, float(in_features) ** 3) + out_features * in_features**2 + min(out_features, in_features) ** 3
    return costs


def _restricted(stats: CovarianceStats, layers: Sequence[str]) -> CovarianceStats:
    """``stats`` of ``layers`` only (the sums shared, not copied)."""
    return CovarianceStats(stats.xtx, stats.count, {layer: stats.input_of[layer] for layer in layers})


def purify_causal_lm_checkpoints(
    config: PretrainedConfig,
    checkpoints: Mapping[str, str | os.PathLike],
    weights: Mapping[str, Mapping[str, Tensor]],
    batches: Mapping[str, Batches],
    settings: PurifySettings,
    scratch: str | os.PathLike,
    collection: StreamedCollection = StreamedCollection(),
    check: Optional[StatisticsCheck] = None,
    max_shard_bytes: int = 2 * 2**30,
    progress: bool = True,
    fabric: Any | None = None,
    pretrained: Optional[Mapping[str, Tensor]] = None,
) -> PurifiedCheckpoints:
    """Purify the Linear weights of each task of ``batches``: statistics from ``checkpoints[task]`` on
    ``batches[task]``, purified tensors read from ``weights[task]`` (the checkpoint, or its DARE'd view),
    written under ``scratch/<task>``.

    With a ``fabric`` of several processes, call it on every rank with that rank's share of the
    calibration batches and a ``scratch`` all ranks see: each decoder layer's statistics are summed
    over the ranks (as the in-memory PAVE's), then its Linears, in groups that read one input, are
    dealt to the ranks by estimated cost (``ranks.balance``) and each rank purifies and writes its
    own; a failure on any rank fails every rank at the end of that layer. ``pretrained`` (the pretrained
    checkpoint's tensors) is read only with ``settings.purify_target == "task_vector"``, where it is required."""
    check_streamed_allocation(settings)
    if settings.purify_target == "task_vector" and pretrained is None:
        raise ValueError("purify_target='task_vector' needs the pretrained checkpoint's tensors")
    rank, world_size = rank_and_size(fabric)
    tasks = list(batches)
    model = meta_causal_lm(config)
    base_names = stored_names(model, pretrained, "the pretrained checkpoint") if settings.purify_target == "task_vector" else None
    head = model.get_output_embeddings()
    head_name = next(name for name, module in model.named_modules() if module is head)
    include = collection.include or (lambda name, module: True)
    steps = config.num_hidden_layers + int(include(head_name, head))
    groups = [[task] for task in tasks] if settings.allocation == "uniform" else [tasks]
    result = PurifiedCheckpoints({}, {task: {} for task in tasks}, {})

    def reduced(part: CovarianceStats) -> CovarianceStats:  # summed on the fabric's device (NCCL: the GPU)
        return part if world_size == 1 else part.all_reduce(
            lambda t: fabric.all_reduce(t.to(fabric.device), reduce_op="sum").to(t.device))

    for group in groups:
        names = {task: stored_names(model, weights[task], f"task '{task}'") for task in group}
        writers = {task: ShardWriter(Path(scratch) / task / f"rank-{rank}", min(max_shard_bytes, SCRATCH_SHARD_BYTES))
                   for task in group}
        for writer in writers.values():
            writer.out_dir.mkdir(parents=True)
        streams = [iter_causal_lm_covariance(checkpoints[task], batches[task], include=collection.include,
                                             dtype=collection.dtype, max_rows=collection.max_rows,
                                             model_dtype=collection.model_dtype, device=collection.device, progress=False)
                   for task in group]
        for _ in tqdm(range(steps), desc=f"PAVE layer by layer [{', '.join(group)}]", disable=not progress,
                      dynamic_ncols=True):
            parts, error = [], None
            try:
                parts = [part for _, part in (next(stream) for stream in streams)]
            except Exception as caught:  # noqa: BLE001 (every rank learns of it before the sum)
                error = caught
            raise_if_any_failed(fabric, error, "PAVE statistics")
            stats = {task: reduced(part) for task, part in zip(group, parts)}
            done: dict[str, tuple[dict[str, int], int]] = {}  # layer -> (kept ranks, full rank), this rank's
            try:
                for task in group if check is not None else ():
                    check(task, stats[task])
                layers = purifiable_layers(stats)
                first = stats[group[0]]
                shapes = {layer: tensor_spec(weights[group[0]], names[group[0]][f"{layer}.weight"])[0] for layer in layers}
                owner = balance(_unit_costs(shapes, first), world_size)
                mine = [layer for layer in layers if owner[first.input_of[layer]] == rank]
                layer_weights = {task: {layer: weights[task][names[task][f"{layer}.weight"]] for layer in mine} for task in group}
                base = None if base_names is None else {layer: pretrained[base_names[f"{layer}.weight"]] for layer in mine}
                for purified in iter_purified(layer_weights, {task: _restricted(stats[task], mine) for task in group}, settings,
                                              pretrained=base):
                    for task, weight in purified.weights.items():
                        if purified.ranks[task] < purified.full_rank:
                            writers[task].add(names[task][f"{purified.layer}.weight"], weight)
                    done[purified.layer] = (purified.ranks, purified.full_rank)
            except Exception as caught:  # noqa: BLE001
                error = caught
            raise_if_any_failed(fabric, error, "PAVE purification")
            done = {layer: outcome for outcomes in gather(fabric, done) for layer, outcome in outcomes.items()}
            for layer in layers:
                kept, result.full_ranks[layer] = done[layer]
                for task in group:
                    result.ranks[task][layer] = kept[task]
        for stream in streams:
            stream.close()
        error = None
        try:
            for writer in writers.values():
                writer.close()
        except Exception as caught:  # noqa: BLE001
            error = caught
        raise_if_any_failed(fabric, error, "writing the purified weights")
        for task in group:
            result.weights[task] = Combined([LazyTensors(Path(scratch) / task / f"rank-{i}") for i in range(world_size)])
    return result


def pave_merge_causal_lm_checkpoints(
    pretrained_path: str | os.PathLike,
    finetuned_paths: Mapping[str, str | os.PathLike],
    out_path: str | os.PathLike,
    method: TaskArithmetic | Ties,
    batches: Mapping[str, Batches],
    settings: PurifySettings,
    *,
    collection: StreamedCollection = StreamedCollection(),
    check: Optional[StatisticsCheck] = None,
    dare: Optional[Dare] = None,
    merge_dare: Optional[Dare] = None,
    scratch_dir: Optional[str | os.PathLike] = None,
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
    fabric: Any | None = None,
) -> PurifiedCheckpoints:
    """PAVE + ``method`` over checkpoints: the tasks of ``batches`` (a subset of ``finetuned_paths``,
    {task: checkpoint}) are purified on their calibration batches, the others keep their plain task
    vectors; the merge goes to ``out_path`` (atomic, sharded, loadable by ``AutoModelForCausalLM``;
    refused if it exists unless ``overwrite``). ``dare``: DARE on the raw deltas before purification,
    as PAVE's ``dare`` key; ``merge_dare``: DARE on the purified task vectors, as a DARE merger after
    PAVE. Names, shapes and dtypes of every checkpoint are checked (headers only) before any work.
    Returns the kept and full ranks; the scratch checkpoints (in a temporary directory under
    ``scratch_dir``) are removed.

    With a ``fabric`` of several processes (DDP), call it on every rank, each with its share of the
    calibration batches; ``out_path`` and ``scratch_dir`` on a filesystem all ranks share. The ranks
    share the purification (``purify_causal_lm_checkpoints``) and the merge
    (``checkpoint_merge.write_merged_checkpoint``) and write one checkpoint, that of one process given
    the same statistics; a failure on any rank fails every rank and leaves ``out_path`` untouched."""
    refuse_replacing_dir(out_path, overwrite)
    check_streamed_allocation(settings)
    tasks = list(finetuned_paths)
    if unknown := [task for task in batches if task not in finetuned_paths]:
        raise ValueError(f"calibration batches for {unknown}, which are not fine-tuned models of {tasks}")
    if dare is not None and merge_dare is not None:
        raise ValueError("DARE before purification and DARE in the merger at once is not supported; choose one")
    config, pretrained, finetuned = open_causal_lm_checkpoints(pretrained_path, list(finetuned_paths.values()))
    plan = merge_plan(meta_causal_lm(config), pretrained, dare or merge_dare)
    labels = [f"task '{task}' ({path})" for task, path in finetuned_paths.items()]
    TaskVectorStream(pretrained, finetuned, plan, labels=labels)  # checks every header before any work
    sources: Sequence[Mapping[str, Tensor]] = finetuned
    if dare is not None:
        specs = {name: tensor_spec(pretrained, name) for name in plan.order}
        states = task_generator_states(plan_draws(plan, specs), dare.seed, len(tasks))
        sources = [DaredWeights(pretrained, tensors, plan, dare, state) for tensors, state in zip(finetuned, states)]
    with shared_temporary_dir(fabric, prefix="pave-purified-", dir=scratch_dir) as scratch:
        purified = purify_causal_lm_checkpoints(
            config, {task: finetuned_paths[task] for task in batches}, dict(zip(tasks, sources)), batches, settings,
            scratch, collection, check, max_shard_bytes, progress, fabric, pretrained)
        views = [Overlay(purified.weights[task], source) if task in batches else source for task, source in zip(tasks, sources)]
        stream = TaskVectorStream(pretrained, views, plan, merge_dare, labels=labels)
        write_merged_checkpoint(pretrained_path, stream, method, out_path, max_shard_bytes=max_shard_bytes,
                                overwrite=overwrite, progress=progress, fabric=fabric)
        for weights in purified.weights.values():
            weights.close()
    return purified
