"""benchmarks/stream_merge_equality.py on a tiny Mistral family: every method's streamed merge equals FusionBench's."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import stream_merge_equality
from benchmarks.child import run_child
from benchmarks.stream_merge_equality import CHILD, METHODS, child, compare, main
from reference.tiny_models import decoder, noisy_copies, tokenizer


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny tied-embedding Mistral (sharded) and 3 noisy "fine-tuned" copies, as checkpoint directories."""
    root = tmp_path_factory.mktemp("family")
    pre = decoder("mistral", num_hidden_layers=2, tie_word_embeddings=True)
    pre.save_pretrained(root / "pre", max_shard_size="40KB")
    tokenizer().save_pretrained(root / "pre")
    for i, model in enumerate(noisy_copies(pre, 3, scale=0.02)):
        model.save_pretrained(root / f"ft{i}")
    return pre, root, [str(root / f"ft{i}") for i in range(3)]


def test_every_method_equals_fusion_bench_bit_for_bit(family, tmp_path, monkeypatch):
    pre, root, finetuned = family

    def in_process(script, arguments):  # the children's code, without the fresh interpreters' import time
        with torch.random.fork_rng():
            return json.loads(json.dumps(child(arguments)))

    monkeypatch.setattr(stream_merge_equality, "run_child", in_process)
    out = tmp_path / "results.json"
    main(["--pretrained", str(root / "pre"), "--finetuned", *finetuned, "--out", str(out), "--tmp", str(tmp_path),
          "--min-available-gb", "0", "--seed", "3"])
    rows = json.loads(out.read_text())["rows"]
    assert [row["method"] for row in rows] == list(METHODS)
    tensors = len(pre.state_dict())  # lm_head.weight included: FusionBench's state dict has both tied names
    for row in rows:
        fb = row["fusion_bench"]
        assert (fb["tensors"], fb["equal"], fb["max_abs_diff"], fb["all_equal"]) == (tensors, tensors, 0.0, True), row["method"]
    assert rows[2]["settings"] == {"scaling_factor": 0.6, "threshold": 20, "remove_keys": [], "merge_func": "sum",
                                   "sparsity_ratio": 0.5, "only_on_linear_weights": False, "rescale": True, "seed": 3}
    assert not list(tmp_path.glob("tmp*/*"))  # each streamed checkpoint was removed after its comparison


def test_the_child_runs_in_a_fresh_interpreter_and_reports_its_peak(family, tmp_path):
    _, root, finetuned = family
    result = run_child(CHILD, {"side": "streamed", "method": "task_arithmetic", "settings": {"scaling_factor": 1.0},
                               "pretrained": str(root / "pre"), "finetuned": finetuned, "out": str(tmp_path / "ta")})
    assert result["seconds"] > 0 and result["peak_rss_mb"] > 100  # torch alone takes more
    assert (tmp_path / "ta" / "config.json").is_file()


def test_compare_counts_unequal_and_missing_tensors():
    want = {"a": torch.zeros(3), "b": torch.ones(2), "c": torch.ones(1)}
    got = {"a": torch.zeros(3), "b": torch.tensor([1.0, 1.5]), "d": torch.ones(1)}
    assert compare(got, want) == {"tensors": 3, "equal": 1, "max_abs_diff": 0.5, "unequal": ["b"],
                                  "key_mismatch": ["c", "d"], "all_equal": False}
