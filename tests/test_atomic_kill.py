"""Interrupted runs: a writer SIGKILLed mid-save (in a subprocess) leaves the target in its old state
or absent, never half-written, and the next run succeeds and cleans up the dead writer's staging.

Deterministic kill points: either the writer stops itself via the FUSION_BENCH_PAVE_PAUSE_IN_STAGING
hook once its staging output is complete but not yet renamed, or it writes slowly and is killed as
soon as its staging file holds some bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionModel

from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.utils import instantiate
from fusion_bench_pave.io.atomic import MANIFEST, PAUSE_ENV, atomic_write_text
from fusion_bench_pave.io.smile import load_smile_model, save_smile_model
from fusion_bench_pave.pave.cache import CovarianceCache
from fusion_bench_pave.pave.covariance import CovarianceStats
from fusion_bench_pave.smile.algorithm import SmileUpscalingAlgorithm

from conftest import REPO_ROOT, child_pythonpath, compose_fusion_bench



def start(code: str, *args: str, pause: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": child_pythonpath()}
    env.pop(PAUSE_ENV, None)
    if pause is not None:
        env[PAUSE_ENV] = pause
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"writer exited ({proc.returncode}) before the kill point:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("writer never reached the kill point")
        time.sleep(0.02)


def stopped(proc: subprocess.Popen):
    return lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def staging_of(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.tmp-*"))


SLOW_WRITER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("atomic", sys.argv[2])  # by path: the plugin import takes seconds
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.atomic_file(sys.argv[1], "wb") as handle:
    for _ in range(3000):
        handle.write(b"x" * 4096)
        handle.flush()
        time.sleep(0.01)
"""


def test_kill_in_the_middle_of_a_file_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")
    proc = start(SLOW_WRITER, str(target), str(REPO_ROOT / "fusion_bench_pave" / "io" / "atomic.py"))
    wait_until(proc, lambda: any(p.stat().st_size > 0 for p in staging_of(target)))
    kill(proc)
    assert target.read_text() == "old"
    (half,) = staging_of(target)  # the dead writer's partial file, beside the target, never at it
    assert 0 < half.stat().st_size < 3000 * 4096
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and staging_of(target) == []


SMILE_WRITER = """
import sys, torch
from fusion_bench_pave.io.smile import save_smile_model
from test_atomic_kill import smile_model
torch.set_num_threads(1)
save_smile_model(smile_model(int(sys.argv[2])), sys.argv[1], overwrite=True)
"""


def smile_model(seed: int) -> torch.nn.Module:
    """A tiny CLIP SMILE model whose experts depend on ``seed``."""
    from reference.tiny_models import clip_vision, noisy_copies

    base = clip_vision()
    pool = {"_pretrained_": base, **{f"m{i}": m for i, m in enumerate(noisy_copies(base, 2, seed=seed))}}
    return SmileUpscalingAlgorithm(gate_k=2, k=4).run(BaseModelPool(pool))


def smile_weights(path: Path) -> dict[str, torch.Tensor]:
    from reference.tiny_models import clip_vision

    return load_smile_model(clip_vision(), path).state_dict()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("old", [True, False], ids=["over-old-output", "fresh"])
def test_kill_while_saving_a_smile_model_leaves_the_old_model_or_nothing(tmp_path, old):
    target = tmp_path / "smile"
    if old:
        save_smile_model(smile_model(1), target)
        before = smile_weights(target)
    proc = start(SMILE_WRITER, str(target), "2", pause="smile")
    wait_until(proc, stopped(proc))
    (staging,) = staging_of(target)
    assert sorted(p.name for p in staging.iterdir()) == [MANIFEST, "smile.json", "smile.safetensors"]
    kill(proc)
    if old:
        assert_same(smile_weights(target), before)
    else:
        assert not target.exists()
    new = smile_model(2)
    save_smile_model(new, target, overwrite=True)  # the rerun succeeds and removes the dead writer's staging
    assert staging_of(target) == [] and sorted(os.listdir(tmp_path)) == ["smile"]
    assert_same(smile_weights(target), new.state_dict())


def test_overwrite_refuses_files_added_while_the_writer_was_stopped(tmp_path):
    """The writer checks the target again before replacing it: a file someone put there while the
    (overwrite=true) save was under way is kept, with the old model, and the writer fails."""
    target = tmp_path / "smile"
    save_smile_model(smile_model(1), target)
    before = smile_weights(target)
    refusal_printed = SMILE_WRITER.replace("save_smile_model(", "try:\n    save_smile_model(") + (
        "except FileExistsError as error:\n    print(error)\n    sys.exit(3)\n")
    proc = start(refusal_printed, str(target), "2", pause="smile")
    wait_until(proc, stopped(proc))
    (target / "eval.csv").write_text("someone's results")
    proc.send_signal(signal.SIGCONT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3
    assert stdout.startswith(f"{target} holds files fusion_bench_pave did not write there (not in its {MANIFEST}): "
                             "eval.csv; overwrite=true replaces only what we wrote")
    assert sorted(os.listdir(tmp_path)) == ["smile"]  # the writer removed its staging
    assert sorted(os.listdir(target)) == [MANIFEST, "eval.csv", "smile.json", "smile.safetensors"]
    assert_same(smile_weights(target), before)


CACHE_WRITER = """
import sys, torch
from fusion_bench_pave.pave.cache import CovarianceCache
from test_atomic_kill import cache_stats
CovarianceCache(sys.argv[1]).save({"task": "t"}, cache_stats(float(sys.argv[2])))
"""


def cache_stats(value: float) -> CovarianceStats:
    return CovarianceStats(xtx={"x": torch.full((64, 64), value, dtype=torch.float64)}, count={"x": 3}, input_of={"fc": "x"})


def test_kill_while_saving_the_covariance_cache_keeps_the_old_entry(tmp_path):
    cache = CovarianceCache(tmp_path)
    file = cache.save({"task": "t"}, cache_stats(1.0))
    proc = start(CACHE_WRITER, str(tmp_path), "2", pause=file.name)
    wait_until(proc, stopped(proc))
    kill(proc)
    assert len(staging_of(file)) == 1
    assert torch.equal(cache.load({"task": "t"}).xtx["x"], cache_stats(1.0).xtx["x"])
    cache.save({"task": "t"}, cache_stats(2.0))
    assert torch.equal(cache.load({"task": "t"}).xtx["x"], cache_stats(2.0).xtx["x"])
    assert [p.name for p in tmp_path.iterdir()] == [file.name]


@pytest.mark.slow
def test_cli_killed_while_saving_the_merged_model_keeps_the_old_model(tmp_path):
    pool = instantiate(compose_fusion_bench(["modelpool=tiny_clip"]).modelpool)
    target = tmp_path / "merged"
    pool.save_model(pool.load_pretrained_model(), str(target))
    exe = Path(sys.executable).with_name("fusion_bench")
    args = [str(exe), "method=task_arithmetic", "method.scaling_factor=0.5", "modelpool=tiny_clip", "~taskpool",
            f"path.log_dir={tmp_path / 'logs'}", f"merged_model_save_path={target}",
            "merged_model_save_kwargs={overwrite: true}", "print_config=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_ENV: "merged"}
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(proc, stopped(proc))
    (staging,) = staging_of(target)
    assert (staging / "model.safetensors").is_file()
    kill(proc)
    reloaded, pretrained = CLIPVisionModel.from_pretrained(target).state_dict(), pool.load_pretrained_model().state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in pretrained.items())

    merged = TaskArithmeticAlgorithm(scaling_factor=0.5).run(pool)
    pool.save_model(merged, str(target), overwrite=True)  # what the rerun's save does
    assert staging_of(target) == []
    reloaded = CLIPVisionModel.from_pretrained(target).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in merged.state_dict().items())
