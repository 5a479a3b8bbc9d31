"""The GLUE protocol: metrics against scikit-learn / SciPy, the per-task-head task pool against an
independent evaluation, and `fusion_bench method=pave_ta` end to end on offline replicas of the
RoBERTa-base and GPT-2 GLUE pools (reference/tiny_glue.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_fusion_bench
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

import fusion_bench_pave.plugin  # noqa: F401  (compat repair before fusion_bench imports)
from fusion_bench_pave.taskpool import ClassificationHeadsTaskPool
from fusion_bench_pave.taskpool.glue import load_glue
from fusion_bench_pave.taskpool.metrics import accuracy, f1, matthews_correlation, pearson, spearman
from reference.tiny_glue import (GLUE, GPT2_GLUE, GPT2_TOKEN, build_gpt2_glue, build_roberta_glue, glue_split, gpt2_tokenizer,
                                 roberta_tokenizer)

METRICS = {"glue-cola": ["matthews_correlation"], "glue-stsb": ["pearson", "spearman"], "glue-mrpc": ["accuracy", "f1"],
           "glue-qqp": ["accuracy", "f1"]}


# ------------------------------------------------------------------ metrics
@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_matthews_and_accuracy_match_scikit_learn(classes, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (57,), generator=generator)
    predictions = torch.where(torch.rand(57, generator=generator) < 0.6, labels,
                              torch.randint(0, classes, (57,), generator=generator))
    assert matthews_correlation(predictions, labels) == pytest.approx(
        matthews_corrcoef(labels.numpy(), predictions.numpy()), rel=1e-12, abs=1e-15)
    assert accuracy(predictions, labels) == pytest.approx(float((predictions == labels).double().mean()))
    if classes == 2:
        assert f1(predictions, labels) == pytest.approx(f1_score(labels.numpy(), predictions.numpy()), rel=1e-12)


def test_matthews_of_a_constant_prediction_is_zero_as_in_scikit_learn():
    labels = torch.tensor([0, 1, 1, 0, 1])
    predictions = torch.ones(5, dtype=torch.long)
    assert matthews_correlation(predictions, labels) == matthews_corrcoef(labels.numpy(), predictions.numpy()) == 0


def test_f1_without_any_positive_is_zero_as_in_scikit_learn():
    negatives = torch.zeros(4, dtype=torch.long)
    assert f1(negatives, negatives) == f1_score(negatives.numpy(), negatives.numpy(), zero_division=0) == 0


@pytest.mark.parametrize("seed", range(4))
def test_pearson_and_spearman_match_scipy_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 6, (41,), generator=generator).double() / 5 * 5  # STS-B-like scores, many ties
    predictions = (labels + torch.randn(41, generator=generator, dtype=torch.float64)).round(decimals=1)
    # float64 sums in another order than SciPy's: agreement to a few ulp
    assert pearson(predictions, labels) == pytest.approx(pearsonr(predictions, labels).statistic, rel=1e-12)
    assert spearman(predictions, labels) == pytest.approx(spearmanr(predictions, labels).statistic, rel=1e-12)


# --------------------------------------------------------- the task pool
@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> dict[str, Path]:
    return build_roberta_glue(tmp_path_factory.mktemp("roberta-glue"))


def eval_split(task: str) -> str:
    return GLUE[task][2]


def independent_scores(classifier, dataset, tokenizer=None) -> dict[str, float]:
    """The classifier's GLUE metrics on ``dataset`` in one padded batch, with scikit-learn / SciPy."""
    tokenizer = tokenizer or roberta_tokenizer()
    columns = [c for c in dataset.column_names if c not in ("label", "idx")]
    encoded = tokenizer(*(list(dataset[c]) for c in columns), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = classifier.eval()(**encoded).logits.double().numpy()
    labels = np.array(dataset["label"])
    if logits.shape[1] == 1:
        return {"pearson": pearsonr(logits[:, 0], labels).statistic, "spearman": spearmanr(logits[:, 0], labels).statistic}
    predictions = logits.argmax(1)
    scores = {"accuracy": float((predictions == labels).mean()), "matthews_correlation": matthews_corrcoef(labels, predictions)}
    if logits.shape[1] == 2:
        scores["f1"] = f1_score(labels, predictions, zero_division=0)
    return scores


def assert_report_matches(report: dict, replica: dict[str, Path], body, tasks=GLUE, tokenizer=None) -> None:
    """Each task's reported metrics equal those of its fine-tuned classifier with ``body`` put in
    place of its own (module swap, not the task pool's weight copy)."""
    from transformers import AutoModelForSequenceClassification

    scores = []
    for task in tasks:
        classifier = AutoModelForSequenceClassification.from_pretrained(replica["finetuned"] / task)
        setattr(classifier, classifier.base_model_prefix, body)
        expected = independent_scores(classifier, load_glue(str(replica["glue"]), task, eval_split(task)), tokenizer)
        reported = report[f"glue-{task}"]
        names = METRICS.get(f"glue-{task}", ["accuracy"])
        assert set(reported) == {*names, "score"}
        for name in names:  # same forward in one batch; metric formulas in another float64 order
            assert reported[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), (task, name)
        assert reported["score"] == pytest.approx(np.mean([expected[n] for n in names]), rel=1e-9, abs=1e-12)
        scores.append(reported["score"])
    assert report["average"] == {"score": pytest.approx(np.mean(scores), rel=1e-12)}


def taskpool(replica: dict[str, Path], **overrides) -> ClassificationHeadsTaskPool:
    settings = dict(
        test_datasets={f"glue-{t}": load_glue(str(replica["glue"]), t, eval_split(t)) for t in GLUE},
        classifiers={f"glue-{t}": str(replica["finetuned"] / t) for t in GLUE},
        tokenizer=str(replica["pretrained"]),
        metrics=METRICS,
    )
    return ClassificationHeadsTaskPool(**{**settings, **overrides})


def body(path: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, add_pooling_layer=False).eval()


def test_each_task_is_scored_with_its_own_head(replica):
    pretrained = body(replica["pretrained"])
    assert_report_matches(taskpool(replica).evaluate(pretrained), replica, pretrained)


def test_a_fine_tuned_body_scores_as_its_own_classifier(replica):
    from transformers import AutoModelForSequenceClassification

    report = taskpool(replica).evaluate(body(replica["finetuned"] / "cola"))
    own = AutoModelForSequenceClassification.from_pretrained(replica["finetuned"] / "cola")
    expected = independent_scores(own, load_glue(str(replica["glue"]), "cola", "validation"))
    assert report["glue-cola"]["matthews_correlation"] == pytest.approx(expected["matthews_correlation"], abs=1e-12)


def test_a_body_that_does_not_fit_the_heads_is_refused_naming_the_task(replica):
    from transformers import AutoModel

    with_pooler = AutoModel.from_pretrained(replica["pretrained"])  # RobertaModel with its pooler
    with pytest.raises(ValueError, match=r"task 'glue-cola': the merged RobertaModel and the body .* \['pooler"):
        taskpool(replica).evaluate(with_pooler)


def test_bad_task_pool_settings_fail_at_construction_or_before_scoring(replica):
    with pytest.raises(ValueError, match=r"task 'glue-cola': unknown metrics \['bleu'\]"):
        taskpool(replica, metrics={"glue-cola": ["bleu"]})
    with pytest.raises(ValueError, match=r"classifiers has no entry for test task\(s\) \['glue-rte'\]"):
        taskpool(replica, classifiers={f"glue-{t}": str(replica["finetuned"] / t) for t in GLUE if t != "rte"})
    hidden = glue_split("sst2", 8, 0).map(lambda row: {"label": -1})  # GLUE's test splits
    pool = taskpool(replica, test_datasets={"glue-sst2": hidden})
    with pytest.raises(ValueError, match=r"task 'glue-sst2': the test dataset has rows without a label"):
        pool.evaluate(body(replica["pretrained"]))


# ------------------------------------------------------------ the CLI, end to end
def run_pave_ta(pools: str, replica: dict[str, Path], tmp_path: Path) -> tuple[dict, dict, Path]:
    """``fusion_bench method=pave_ta modelpool=<pools> taskpool=<pools>`` on ``replica`` (rho 0.75, the
    merged body saved): the program report, PAVE's report and the merged body's directory."""
    log_dir, merged_dir = tmp_path / "logs", tmp_path / "merged"
    run_fusion_bench([
        "method=pave_ta", f"modelpool={pools}", f"taskpool={pools}",
        f"modelpool.pretrained_model_name_or_path={replica['pretrained']}",
        f"modelpool.finetuned_prefix={replica['finetuned']}/", f"modelpool.glue={replica['glue']}",
        "method.num_samples=16", "method.rho=0.75", "method.cache_dir=null",
        f"path.log_dir={log_dir}", f"merged_model_save_path={merged_dir}",
    ], cwd=tmp_path)
    report = json.loads((log_dir / "program_report.json").read_text())
    return report, json.loads((log_dir / "pave_report.json").read_text()), merged_dir


@pytest.mark.slow
def test_cli_pave_on_the_roberta_glue_replica_reports_each_heads_metrics(replica, tmp_path):
    report, pave, merged_dir = run_pave_ta("roberta-base_glue", replica, tmp_path)
    assert set(pave["ranks"]) == {f"glue-{t}" for t in GLUE} and all(r < 1 for r in pave["kept_ratio"].values())
    assert_report_matches(report, replica, body(merged_dir))


@pytest.mark.slow
def test_cli_pave_on_the_gpt2_glue_replica_purifies_conv1d_and_scores_each_tasks_head(tmp_path):
    """modelpool/taskpool=gpt-2_glue_heads: GPT2Model bodies merged (their Conv1D layers purified), each
    task scored with its own GPT2ForSequenceClassification `score` head on the last non-padding token."""
    from transformers import GPT2Model

    replica = build_gpt2_glue(tmp_path / "gpt2-glue")
    report, pave, merged_dir = run_pave_ta("gpt-2_glue_heads", replica, tmp_path)
    conv1d = {f"h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(pave["full_ranks"]) == conv1d  # every Conv1D of the body, nothing else (no `score`: bodies)
    assert set(pave["ranks"]) == {f"glue-{t}" for t in GPT2_GLUE} and all(r < 1 for r in pave["kept_ratio"].values())
    merged = GPT2Model.from_pretrained(merged_dir).eval()
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = GPT2_TOKEN  # as the pool's tokenizer config sets it
    assert_report_matches(report, replica, merged, GPT2_GLUE, tokenizer)
