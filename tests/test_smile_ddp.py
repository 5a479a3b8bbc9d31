"""Streaming SMILE causal-LM upscaling under Lightning Fabric DDP (2 CPU processes, gloo): the ranks
share the output shards and write the files one process writes, bit for bit; refusals and failures
on any rank fail every rank and leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import child_pythonpath

import fusion_bench_pave.plugin  # noqa: F401  (compat repair, Auto classes)
from fusion_bench.modelpool import CausalLMPool
from fusion_bench_pave.io.atomic import MANIFEST
from fusion_bench_pave.io.safetensors import LazyTensors
from fusion_bench_pave.smile.algorithm import SmileMistralUpscalingAlgorithm
from reference.tiny_models import decoder, noisy_copies

# rank_of_expert above the 16-wide k/v projections (clamped per projection); ~100 KB shards: several per rank
SETTINGS = dict(num_experts_per_tok=2, rank_of_router=20, rank_of_expert=24, max_shard_gb=1e-4)

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from lightning import Fabric
    from fusion_bench.modelpool import CausalLMPool
    import fusion_bench_pave.smile.causal_lm.upscale as upscale
    from fusion_bench_pave.smile.algorithm import SmileMistralUpscalingAlgorithm

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    pool = lambda: CausalLMPool({{name: str(root / name) for name in ["_pretrained_", "ft0", "ft1"]}}, tokenizer=None)

    def run(**kwargs):
        algo = SmileMistralUpscalingAlgorithm(**{{**{settings!r}, **kwargs}})
        algo.fabric = fabric
        return algo.run(pool())

    def error_of(call):
        try:
            call()
        except Exception as error:
            return f"{{type(error).__name__}}: {{error}}"
        return None

    report = {{"world": fabric.world_size, "threads": torch.get_num_threads()}}
    model = run(model_path=str(out / "smile"))
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save(model(ids).logits, out / f"logits{{fabric.global_rank}}.pt")
    report["scratch"] = type(run()).__name__  # no model_path: rank 0's temporary directory, shared
    report["exists"] = error_of(lambda: upscale.upscale_causal_lm_checkpoint(
        root / "_pretrained_", [root / "ft0", root / "ft1"], out / "smile", progress=False, fabric=fabric))
    real = upscale.smile_tensors
    def fail_on_rank_1(*args, **kwargs):
        if fabric.global_rank == 1:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)
    upscale.smile_tensors = fail_on_rank_1
    report["failed"] = error_of(lambda: run(model_path=str(out / "failed")))
    report["overwrite_failed"] = error_of(lambda: run(model_path=str(out / "smile"), overwrite=True, rank_of_expert=8))
    upscale.smile_tensors = real
    (out / f"report{{fabric.global_rank}}.json").write_text(json.dumps(report))
    fabric.barrier()
    """
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    pre = decoder("mistral", num_hidden_layers=3)
    root = tmp_path_factory.mktemp("ddp_mistral")
    for name, model in [("_pretrained_", pre), *((f"ft{i}", m) for i, m in enumerate(noisy_copies(pre, 2, only=r"_proj\.weight")))]:
        model.save_pretrained(root / name)
    return root


def files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_the_single_process_output(tmp_path, checkpoints):
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "smile_ddp.py"
    script.write_text(SCRIPT.format(settings=SETTINGS))
    # one torch thread per process in both runs: MKL gives other bits at other thread counts on some CPUs
    env = {**os.environ, "PYTHONPATH": child_pythonpath(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(checkpoints), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((out / f"report{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2] and [r["threads"] for r in reports] == [1, 1]

    torch.set_num_threads(1)
    models = {name: str(checkpoints / name) for name in ["_pretrained_", "ft0", "ft1"]}
    single = SmileMistralUpscalingAlgorithm(model_path=str(tmp_path / "single"), **SETTINGS).run(CausalLMPool(models, tokenizer=None))

    ddp_files, single_files = files(out / "smile"), files(tmp_path / "single")
    shards = [name for name in single_files if name.endswith(".safetensors")]
    assert len(shards) >= 4  # both ranks wrote shards
    assert ddp_files.keys() == single_files.keys() and MANIFEST in ddp_files
    for name in single_files:
        assert ddp_files[name] == single_files[name], name  # bit for bit: weights, index, config, record, manifest
    ddp_tensors, single_tensors = LazyTensors(out / "smile"), LazyTensors(tmp_path / "single")
    assert list(ddp_tensors) == list(single_tensors)
    assert all(torch.equal(ddp_tensors[n], single_tensors[n]) for n in single_tensors)
    assert json.loads(ddp_files["config.json"])["layer_ranks"]["layers.0.self_attn.k_proj"] == [16, 16]
    with torch.no_grad():
        expected = single(torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))).logits
    for rank in (0, 1):
        assert torch.equal(torch.load(out / f"logits{rank}.pt", weights_only=True), expected), rank

    assert [r["scratch"] for r in reports] == ["SmileMistralForCausalLM"] * 2
    # refuse-overwrite: rank 0 refuses before any work, rank 1 learns of it
    assert reports[0]["exists"].startswith("FileExistsError: ") and "smile already exists" in reports[0]["exists"]
    assert reports[1]["exists"].startswith("RuntimeError: ") and "rank(s) [0]: rank 0: FileExistsError" in reports[1]["exists"]
    # a failure on rank 1 only fails both ranks; nothing is published, no staging is left, the old output stays
    assert reports[1]["failed"] == "RuntimeError: injected failure"
    assert "SMILE upscaling failed on rank(s) [1]: rank 1: RuntimeError: injected failure" in reports[0]["failed"]
    assert "failed on rank(s) [1]" in reports[0]["overwrite_failed"] and reports[1]["overwrite_failed"] == "RuntimeError: injected failure"
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith((".pt", ".json"))) == ["smile"]
    assert files(out / "smile") == ddp_files
