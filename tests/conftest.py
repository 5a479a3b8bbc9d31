"""Shared test set-up: every test session builds the tiny zoos into its own fresh cache directory
(about 20 s), so results never depend on what an earlier run or another checkout left behind.
Set FUSION_BENCH_PAVE_TEST_CACHE to reuse a directory across runs while developing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_fork import CliForkServer

REPO_ROOT = Path(__file__).resolve().parent.parent
SESSION_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def session_thread_count():
    """Give every test the session's torch thread count back, so a test that changes it cannot change
    the results of the tests after it (MKL's kernels give other bits at other counts on some CPUs)."""
    yield
    torch.set_num_threads(SESSION_THREADS)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device a test should run on: the CPU everywhere, CUDA where torch sees a GPU."""
    return torch.device(request.param)


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = Path(os.environ.get("FUSION_BENCH_PAVE_TEST_CACHE") or tmp_path_factory.mktemp("fbp-cache"))
    os.environ["FUSION_BENCH_PAVE_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def tiny_zoo(tiny_cache: Path):
    """``tiny_zoo("clip")`` -> directory of the tiny CLIP zoo, built once per session."""
    from fusion_bench_pave.assets import ensure_zoo

    return lambda kind: ensure_zoo(f"tiny_{kind}", root=tiny_cache)


def child_pythonpath() -> str:
    """PYTHONPATH for a Python child process that imports test modules or ``reference``."""
    return os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])


def compose_fusion_bench(overrides: list[str], return_hydra_config: bool = False):
    """Compose FusionBench's main config exactly as its CLI does (same config dir, our plugin); with
    return_hydra_config, cfg.hydra holds Hydra's own node (runtime.choices: each group's option)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fusion_bench.utils.hydra_utils import get_default_config_path

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=get_default_config_path(), version_base=None):
        return compose("fabric_model_fusion", overrides=overrides, return_hydra_config=return_hydra_config)


_CLI: CliForkServer | None = None


@pytest.fixture(scope="session", autouse=True)
def cli_fork_server(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """The ``fusion_bench`` runner of this session (tests/cli_fork.py), started on first use with the
    session's environment (after ``tiny_cache`` set it) and stopped at the end."""
    global _CLI
    _CLI = CliForkServer(Path(sys.executable).with_name("fusion_bench"), tmp_path_factory.mktemp("cli"))
    yield _CLI
    _CLI.close()


def fusion_bench_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the ``fusion_bench`` console script of this environment as its own process (tests/cli_fork.py),
    with the test's environment and ``cwd``; its exit status and output, as ``subprocess.run`` gives them."""
    return _CLI.run(args, cwd=cwd, timeout=timeout)


def run_fusion_bench(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``fusion_bench_cli`` that fails the test, with the output, unless the run succeeds."""
    proc = fusion_bench_cli(args, cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"fusion_bench {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
