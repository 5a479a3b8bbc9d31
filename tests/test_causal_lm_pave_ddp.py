"""Streamed PAVE for causal LMs under Lightning Fabric DDP (2 CPU processes, gloo): the ranks share the
calibration batches, the purification and the merge, and write the checkpoint one process writes,
bit for bit; a failure on one rank fails both and leaves no output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import child_pythonpath

import fusion_bench_pave.plugin  # noqa: F401  (compat repair before fusion_bench imports)
from fusion_bench_pave.io.atomic import MANIFEST
from fusion_bench_pave.io.safetensors import LazyTensors
from fusion_bench_pave.modelpool import CausalLMPool
from fusion_bench_pave.pave.causal_lm_algorithm import PAVECausalLM

TA = {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
TIES = {"_target_": "fusion_bench.method.TiesMergingAlgorithm", "scaling_factor": 0.7, "threshold": 20, "remove_keys": [],
        "merge_func": "sum"}
DARE_TIES = {"_target_": "fusion_bench.method.DareTiesMerging", "scaling_factor": 0.7, "threshold": 20,
             "remove_keys": [], "merge_func": "sum", "sparsity_ratio": 0.5, "only_on_linear_weights": False, "rescale": True}
RUNS = {"ta_uniform": dict(merger=TA, allocation="uniform"), "ta_per_layer": dict(merger=TA, allocation="per_layer"),
        "ties_uniform": dict(merger=TIES, allocation="uniform"), "ties_per_layer": dict(merger=TIES, allocation="per_layer"),
        "dare_ties_per_layer": dict(merger=DARE_TIES, allocation="per_layer"),  # DARE on the purified task vectors
        "dare_then_ties": dict(merger=TIES, allocation="uniform", dare={"sparsity_ratio": 0.5})}  # DARE before purifying
# ~20 KB shards: several per rank
SETTINGS = dict(rho=0.75, num_samples=8, batch_size=4, num_rows=None, max_length=32, eps0=0.01, max_shard_gb=2e-5)
TASKS = ["sentiment", "topic", "weather"]


def tiny_pool(zoo: Path) -> CausalLMPool:
    """The tiny Mistral zoo as a CausalLMPool of checkpoint directories with calibration data."""
    return CausalLMPool({"_pretrained_": str(zoo / "pretrained"), **{task: str(zoo / "models" / task) for task in TASKS}},
                        train_datasets={task: {"_target_": "datasets.load_from_disk", "dataset_path": str(zoo / "data" / task / "train")}
                                        for task in TASKS},
                        tokenizer=str(zoo / "pretrained"))


def run(name: str, zoo: Path, out: Path, fabric=None, **kwargs) -> dict:
    """PAVECausalLM of ``RUNS[name]`` into ``out / name``; its extras."""
    algo = PAVECausalLM(output_path=str(out / name), **{**SETTINGS, **RUNS[name], **kwargs})
    if fabric is not None:
        algo.fabric = fabric
    algo.run(tiny_pool(zoo))
    return algo.extras


SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from lightning import Fabric
    import fusion_bench_pave.pave.causal_lm_purification as purification
    import fusion_bench_pave.merging.stream as stream
    import fusion_bench_pave.pave.task_statistics as task_statistics
    from fusion_bench_pave.io.safetensors import LazyTensors
    from fusion_bench_pave.pave.causal_lm_algorithm import PAVECausalLM
    from test_causal_lm_pave_ddp import RUNS, SETTINGS, run, tiny_pool

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    zoo, out = Path(sys.argv[1]), Path(sys.argv[2])
    report = {"world": fabric.world_size, "threads": torch.get_num_threads(), "extras": {}}
    collect, report["batches"] = purification.iter_causal_lm_covariance, []
    def counted(checkpoint, batches, **kwargs):  # the calibration batches this rank collects on, per task
        batches = list(batches)
        report["batches"].append(len(batches))
        return collect(checkpoint, batches, **kwargs)
    purification.iter_causal_lm_covariance = counted
    report["sharded"] = run("ties_per_layer", zoo, out / "sharded", fabric)  # each rank its share of the batches
    purification.iter_causal_lm_covariance = collect
    # every rank all batches: the summed statistics are twice one process's, their covariances its bits
    task_statistics.shard = lambda indices, rank, world_size, batch_size: list(indices)
    purify, report["purified"] = purification.iter_purified, []
    def recorded(*args, **kwargs):  # the Linears this rank purifies
        for layer in purify(*args, **kwargs):
            report["purified"].append(layer.layer)
            yield layer
    for name in RUNS:
        purification.iter_purified = recorded if name == "ta_uniform" else purify
        report["extras"][name] = run(name, zoo, out, fabric)
    purification.iter_purified = purify
    # no output_path: rank 0's temporary directory under scratch_dir, shared, loaded by every rank, removed
    (out / "scratch").mkdir(exist_ok=True)
    algo = PAVECausalLM(output_path=None, scratch_dir=str(out / "scratch"), **{**SETTINGS, **RUNS["ta_uniform"]})
    algo.fabric = fabric
    merged, saved = algo.run(tiny_pool(zoo)).state_dict(), LazyTensors(out / "ta_uniform")
    report["scratch"] = all(torch.equal(merged[name], saved[name]) for name in saved)
    fabric.barrier()
    report["scratch_left"] = [p.name for p in (out / "scratch").iterdir()]

    def error_of(call):
        try:
            call()
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return None

    def on_rank_1(module, attribute):  # the function, failing on rank 1
        real = getattr(module, attribute)
        def fail(*args, **kwargs):
            if fabric.global_rank == 1:
                raise RuntimeError("injected failure")
            return real(*args, **kwargs)
        setattr(module, attribute, fail)
        return real

    real = on_rank_1(purification, "iter_purified")  # in the layer-by-layer purification
    report["purify_failed"] = error_of(lambda: run("ta_uniform", zoo, out / "failed", fabric))
    purification.iter_purified = real
    real = on_rank_1(stream, "trim")  # in TIES's sign-vote pass, whose counts are summed over the ranks
    report["merge_failed"] = error_of(lambda: run("ties_uniform", zoo, out, fabric, overwrite=True, rho=0.5))
    stream.trim = real
    (out / f"report{fabric.global_rank}.json").write_text(json.dumps(report))
    fabric.barrier()
    """
)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_the_single_process_checkpoint(tmp_path, tiny_zoo):
    zoo = tiny_zoo("mistral")
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "pave_ddp.py"
    script.write_text(SCRIPT)
    # one torch thread per process in both runs: MKL gives other bits at other thread counts on some CPUs
    env = {**os.environ, "PYTHONPATH": child_pythonpath(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(zoo), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((out / f"report{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2] and [r["threads"] for r in reports] == [1, 1]

    # each rank purified its groups of Linears (q/k/v, o, gate/up, down), for each task in turn
    mine = [set(r["purified"]) for r in reports]
    assert all(mine) and not mine[0] & mine[1] and len(mine[0] | mine[1]) == 2 * 7
    assert sorted(reports[0]["purified"] + reports[1]["purified"]) == sorted(3 * [*mine[0], *mine[1]])

    torch.set_num_threads(1)
    single = tmp_path / "single"
    for name in RUNS:
        extras = json.loads(json.dumps(run(name, zoo, single)))  # as the report holds them
        assert reports[0]["extras"][name] == reports[1]["extras"][name] == extras, name
        assert 0 < min(extras["kept_ratio"].values()) < 1  # purified: some ranks dropped
        ddp_files, single_files = files(out / name), files(single / name)
        shards = [file for file in single_files if file.endswith(".safetensors")]
        assert len(shards) >= 4, name  # both ranks merged and wrote shards
        assert ddp_files.keys() == single_files.keys() and MANIFEST in ddp_files
        ddp_tensors, single_tensors = LazyTensors(out / name), LazyTensors(single / name)
        assert list(ddp_tensors) == list(single_tensors)
        assert not [key for key in single_tensors if not torch.equal(ddp_tensors[key], single_tensors[key])], name
        assert ddp_files == single_files, name  # bit for bit: shards, index, config, tokenizer, manifest

    # the calibration batches shared (one of the two per task on each rank): the summed statistics are one
    # process's up to the order of the float64 additions (as in-memory PAVE's under DDP); here the merged
    # weights differ by at most 7.5e-9 in 7 tensors, with the same ranks
    assert [r["batches"] for r in reports] == [[1, 1, 1], [1, 1, 1]]
    assert reports[0]["sharded"] == reports[1]["sharded"] == reports[0]["extras"]["ties_per_layer"]
    sharded, exact = LazyTensors(out / "sharded" / "ties_per_layer"), LazyTensors(single / "ties_per_layer")
    assert list(sharded) == list(exact)
    for key in exact:
        torch.testing.assert_close(sharded[key], exact[key], rtol=1e-6, atol=1e-7)

    assert [r["scratch"] for r in reports] == [True, True] and [r["scratch_left"] for r in reports] == [[], []]
    shutil.rmtree(out / "scratch")

    # a failure on rank 1 fails both ranks: nothing published, no staging left, the old output unchanged
    assert reports[1]["purify_failed"] == reports[1]["merge_failed"] == "RuntimeError: injected failure"
    assert "PAVE purification failed on rank(s) [1]: rank 1: RuntimeError: injected failure" in reports[0]["purify_failed"]
    assert "TIES sign votes failed on rank(s) [1]: rank 1: RuntimeError: injected failure" in reports[0]["merge_failed"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("report")) == sorted([*RUNS, "sharded"])
    assert files(out / "ties_uniform") == files(single / "ties_uniform")
