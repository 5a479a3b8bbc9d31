"""benchmarks/reproduce.py --official: each protocol's overrides are the ones its yaml and the design name."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks import reproduce

CONFIG = Path(reproduce.__file__).resolve().parents[1] / "fusion_bench_pave" / "config" / "method"


def overrides(protocol: str) -> dict[str, str]:
    return dict(o.removeprefix("method.").split("=", 1) for o in reproduce.OFFICIAL_PROTOCOLS[protocol])


def test_llm_protocol_is_the_causal_lm_yaml_purification():
    """The LLM rows purify as `method=pave_causal_lm` does (only the calibration is the run's own)."""
    yaml = OmegaConf.load(CONFIG / "pave_causal_lm.yaml")
    llm = overrides("llm")
    for key in ("allocation", "eps0", "eps_tol", "regularization", "floor_factor", "sample_order", "seed",
                "calibration_split"):
        assert str(yaml[key]) == llm[key], key
    assert reproduce.OFFICIAL_RHO["llm"] == yaml.rho == 4089 / 4096


def test_glue_protocol_is_per_model_on_the_first_4096_rows_with_padding_counted():
    assert overrides("glue") == {"allocation": "per_model", "num_rows": "4096", "calibration_padding": "longest",
                                 "mask_padding": "false"}
    assert reproduce.OFFICIAL_RHO["glue"] is None  # each method yaml's paper rho


class Parsed(Exception):
    """Raised by the stubbed run with the parsed arguments."""


@pytest.mark.parametrize("argv, protocol", [([], None), (["--official"], "glue"), (["--official", "llm"], "llm")])
def test_official_flag(monkeypatch, argv, protocol):
    def stop(args):
        raise Parsed(args)

    monkeypatch.setattr(reproduce, "run", stop)
    with pytest.raises(Parsed) as parsed:
        reproduce.main(["--zoo", "smollm", *argv])
    assert parsed.value.args[0].official == protocol
