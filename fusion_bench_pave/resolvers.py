"""OmegaConf resolvers our yaml uses.

- ``${fbp_zoo:<name>}``: the directory of a zoo of ``fusion_bench_pave.assets`` (tiny_clip, minilm,
  ...), built on first use, so ``modelpool=tiny_clip`` works on a fresh machine with no set-up step.
- ``${fbp_job_log_dir:<default>}``: in a Hydra multirun, the job's own ``<sweep.dir>/<sweep.subdir>``;
  otherwise ``<default>`` itself, or ``<default>_2``, ``<default>_3``, ... if that is taken (see
  ``claim_dir``). FusionBench's log dir is ``.../${now:%Y-%m-%d_%H-%M-%S}``, which every job of a
  multirun shares, as do single runs started in the same second, so their reports overwrite each other.
"""

from __future__ import annotations

import itertools
import os

from omegaconf import OmegaConf

#: base -> directory claimed for it by this process (a run resolves its log dir more than once).
_claimed: dict[str, str] = {}


def _zoo(name: str) -> str:
    from fusion_bench_pave.assets import ensure_zoo

    return str(ensure_zoo(name))


def _job_log_dir(default: str) -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra = HydraConfig.get()
        return f"{hydra.sweep.dir}/{hydra.sweep.subdir}"
    return claim_dir(default)


def claim_dir(base: str) -> str:
    """Create and return ``base``, or the first of ``base_2``, ``base_3``, ... that does not exist.

    ``mkdir`` fails if the directory exists, so two processes never claim the same one, and the names
    still sort by the time in ``base``. Later calls in this process return the same directory.
    """
    if base not in _claimed:
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        for n in itertools.count(1):
            candidate = base if n == 1 else f"{base}_{n}"
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            _claimed[base] = candidate
            break
    return _claimed[base]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fbp_zoo"):
        OmegaConf.register_new_resolver("fbp_zoo", _zoo, use_cache=True)
    if not OmegaConf.has_resolver("fbp_job_log_dir"):
        OmegaConf.register_new_resolver("fbp_job_log_dir", _job_log_dir)
