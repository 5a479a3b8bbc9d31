"""method/pave.yaml holds every PAVE key; pave_ta / pave_ties / pave_dare_ties / pave_emr set only
the merger, rho and dare, and compose to the base plus those three."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from fusion_bench_pave.pave import PAVE

from conftest import compose_fusion_bench

METHOD_DIR = Path(__file__).resolve().parent.parent / "fusion_bench_pave" / "config" / "method"
OWN_KEYS = {"merger", "rho", "dare"}
TIES = {"_target_": "fusion_bench.method.TiesMergingAlgorithm", "threshold": 20, "remove_keys": [], "merge_func": "sum"}
# method -> (merger, rho, dare)
METHODS = {
    "pave_ta": ({"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}, 31 / 32, None),
    "pave_ties": ({**TIES, "scaling_factor": 0.9}, 63 / 64, None),
    "pave_dare_ties": ({**TIES, "scaling_factor": 0.5}, 63 / 64,
                       {"sparsity_ratio": 0.5, "rescale": True, "only_on_linear_weights": False}),
    "pave_emr": ({"_target_": "fusion_bench.method.emr_merging.EMRMerging"}, 7 / 8, None),
}


def _method(name: str) -> dict:
    return OmegaConf.to_container(compose_fusion_bench([f"method={name}"]).method, resolve=False)


def test_base_mirrors_the_constructor_and_leaves_merger_and_rho_to_the_variants():
    base = _method("pave")
    parameters = [p for p in inspect.signature(PAVE.__init__).parameters if p not in ("self", "kwargs")]
    assert list(base) == ["_target_", *parameters]
    assert base["merger"] == base["rho"] == "???" and base["dare"] is None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_variant_sets_only_merger_rho_dare_and_composes_to_the_base_plus_them(name):
    raw = yaml.safe_load((METHOD_DIR / f"{name}.yaml").read_text())
    assert raw.pop("defaults") == ["pave", "_self_"]
    assert set(raw) <= OWN_KEYS
    merger, rho, dare = METHODS[name]
    expected = {**_method("pave"), "merger": merger, "rho": rho, "dare": dare}
    composed = _method(name)
    assert list(composed) == list(expected) and composed == expected
