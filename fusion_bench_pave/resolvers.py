"""OmegaConf resolvers our yaml uses.

- ``${fbp_zoo:<name>}``: the directory of a zoo of ``fusion_bench_pave.assets`` (tiny_clip, minilm,
  ...), built on first use, so ``modelpool=tiny_clip`` works on a fresh machine with no set-up step.
- ``${fbp_job_log_dir:<default>}``: in a Hydra multirun, the job's own ``<sweep.dir>/<sweep.subdir>``;
  otherwise ``<default>``. FusionBench's log dir is ``.../${now:...}``, which every job of a multirun
  shares, so their reports overwrite each other.
"""

from __future__ import annotations

from omegaconf import OmegaConf


def _zoo(name: str) -> str:
    from fusion_bench_pave.assets import ensure_zoo

    return str(ensure_zoo(name))


def _job_log_dir(default: str) -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra = HydraConfig.get()
        return f"{hydra.sweep.dir}/{hydra.sweep.subdir}"
    return default


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fbp_zoo"):
        OmegaConf.register_new_resolver("fbp_zoo", _zoo, use_cache=True)
    if not OmegaConf.has_resolver("fbp_job_log_dir"):
        OmegaConf.register_new_resolver("fbp_job_log_dir", _job_log_dir)
