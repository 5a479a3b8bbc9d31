"""A paper's table reproduced from its presets: each preset runs through the ``fusion_bench`` CLI (the
presets of one family in one ``fusion_bench -m +preset=a,b,...`` process), and the measured figure
is written beside the paper's, in ``results.md`` and ``results.json``.

The paper's figures are only those our design notes (../shared/design/PAVE.md, SMILE.md) give;
every other cell says "not available to us". ``--replica`` runs the same presets on tiny offline
replicas (hub ids and checkpoint paths swapped by CLI overrides: reference/tiny_glue.py,
reference/paper_replicas.py), which tests the machinery, not the paper: a family without a replica is
listed as not run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fusion_bench_pave.io.atomic import atomic_write_text
from fusion_bench_pave.summarize import evaluation, load_jobs, logged_error

NOT_AVAILABLE = "not available to us"


@dataclass(frozen=True)
class PaperRow:
    """One row of a paper's table and the preset that reproduces it."""

    preset: str
    family: str  # presets of one family run in one process and share one replica
    table: str
    row: str
    metric: str | None  # key of the tasks' metric in the program report (mean over tasks); None: not in it
    figure: str | None = None  # the paper's figure, as our design notes give it; None: not available to us


GLUE_RB, GLUE_G2 = "RoBERTa-base GLUE (8 tasks, validation)", "GPT-2 GLUE (7 tasks; no paper table known to us)"
TA8_B32, TA8_B16, TA8_L14 = "CLIP ViT-B/32, 8 tasks", "CLIP ViT-B/16, 8 tasks", "CLIP ViT-L/14, 8 tasks"
# the CLIP presets of every architecture: one process (its pools differ only in the hub ids), one replica;
# --only <presets> --set <override> sets one architecture apart (e.g. ViT-L/14's num_rows=1024)
CLIP = "clip-vit_ta8"
# the open_clip presets (the paper's own task-vectors checkpoints, FusionBench's OpenCLIPVisionModelPool): one family
OPENCLIP = "openclip-vit_ta8"
OPENCLIP_TABLES = {arch: f"open_clip ViT-{name}, 8 tasks (task-vectors checkpoints)"
                   for arch, name in (("b32", "B/32"), ("b16", "B/16"), ("l14", "L/14"))}
LLM = "LLM math+code, GSM8K (paper: Llama-2-7B fine-tunes; here Qwen2.5-7B, -Math, -Coder)"

#: paper -> its table rows, in table order (the rows of one family together: a family runs as one process)
PAPERS: dict[str, list[PaperRow]] = {
    "pave": [
        PaperRow("pave_ta_roberta-base_glue", "roberta-base_glue", GLUE_RB, "Task Arithmetic + PAVE", "score"),
        PaperRow("pave_ties_roberta-base_glue", "roberta-base_glue", GLUE_RB, "TIES-Merging + PAVE", "score"),
        PaperRow("pave_dare_ties_roberta-base_glue", "roberta-base_glue", GLUE_RB, "DARE-TIES + PAVE", "score"),
        PaperRow("pave_emr_roberta-base_glue", "roberta-base_glue", GLUE_RB, "EMR-Merging + PAVE (official: sst2, qqp, mnli purified)",
                 "score", "84.28 (EMR-Merging alone 80.18; individual 85.55)"),
        PaperRow("pave_emr_roberta-base_glue_all_tasks", "roberta-base_glue", GLUE_RB,
                 "EMR-Merging + PAVE, every task purified (variant, not a paper row)", "score"),
        PaperRow("pave_ta_gpt-2_glue", "gpt-2_glue", GLUE_G2, "Task Arithmetic + PAVE", "score"),
        PaperRow("pave_ties_gpt-2_glue", "gpt-2_glue", GLUE_G2, "TIES-Merging + PAVE", "score"),
        PaperRow("pave_dare_ties_gpt-2_glue", "gpt-2_glue", GLUE_G2, "DARE-TIES + PAVE", "score"),
        PaperRow("pave_emr_gpt-2_glue", "gpt-2_glue", GLUE_G2, "EMR-Merging + PAVE (sst2, qqp, mnli purified)", "score"),
        PaperRow("pave_emr_gpt-2_glue_all_tasks", "gpt-2_glue", GLUE_G2,
                 "EMR-Merging + PAVE, every task purified (variant)", "score"),
        *[PaperRow(f"pave_{method}_clip-vit-{arch}_ta8{suffix}", CLIP, table,
                   f"{name} + PAVE{note}", "accuracy")
          for arch, table in (("b32", TA8_B32), ("b16", TA8_B16), ("l14", TA8_L14))
          for suffix, note in (("", " (official: test-split calibration)"),
                               ("_train", ", train-split calibration (variant, not a paper row)"))
          for method, name in (("ta", "Task Arithmetic"), ("ties", "TIES-Merging"), ("emr", "EMR-Merging"))],
        *[PaperRow(f"pave_{method}_openclip-vit-{arch}_ta8", OPENCLIP, table,
                   f"{name} + PAVE (official: test-split calibration, MLP only)", "accuracy")
          for arch, table in OPENCLIP_TABLES.items()
          for method, name in (("ta", "Task Arithmetic"), ("ties", "TIES-Merging"), ("emr", "EMR-Merging"))],
        # lm-eval writes GSM8K's score to its own output, not to FusionBench's report
        PaperRow("pave_ta_qwen2.5-7b_math_code", "qwen2.5-7b_math_code", LLM,
                 "Task Arithmetic + PAVE (lambda 1.0, rho 4089/4096)", None),
    ],
    "smile": [
        PaperRow("smile_clip-vit-b32_ta8", CLIP, TA8_B32, "SMILE gate_k 16, k 32, top-1", "accuracy",
                 "88.18 (1.61x parameters)"),
        PaperRow("smile_clip-vit-l14_ta8", CLIP, TA8_L14, "SMILE gate_k 16, k 32, top-1", "accuracy",
                 "92.82 (1.47x parameters)"),
        PaperRow("smile_flan-t5-base_glue", "flan-t5-base_glue", "Flan-T5-base GLUE, full fine-tuning",
                 "SMILE gate_k 4, k 16, top-1", "accuracy", "85.0-85.6 (range over gate_k 4..32, k 16..128)"),
        PaperRow("smile_flan-t5-base_glue_lora16", "flan-t5-base_glue_lora16", "Flan-T5-base GLUE, LoRA-16",
                 "SMILE gate_k 2, k 4, top-1", "accuracy", "~84.0 (1.018x parameters)"),
        # lm-eval writes GSM8K's score to its own output, not to FusionBench's report
        PaperRow("smile_mistral-7b_m0_123", "mistral-7b", "Mistral-7B, GSM8K", "SMILE M0;123, rank_of_expert 512", None),
    ],
}


@dataclass(frozen=True)
class Replica:
    """A family's tiny offline replica: ``build(directory, cfg)`` writes what it needs under ``directory``
    and returns the CLI overrides that swap the hub ids of a preset of the family (composed ``cfg``) for
    it; ``metric``: the replica task pool's metric where it replaces the preset's (lm-eval needs the hub)."""

    build: Callable[[Path, Any], list[str]]
    metric: str | None = None


def replica_glue(kind: str) -> Replica:
    """The GLUE replica ``kind`` (reference/tiny_glue.py). Train splits of 512 rows, so the presets' own
    calibration settings (512 samples, 4096 rows) run unchanged."""

    def build(root: Path, cfg) -> list[str]:
        from reference import tiny_glue

        paths = getattr(tiny_glue, f"build_{kind}_glue")(root, train_rows=512)
        return [f"++modelpool.pretrained_model_name_or_path={paths['pretrained']}",
                f"++modelpool.finetuned_prefix={paths['finetuned']}/", f"++modelpool.glue={paths['glue']}"]

    return Replica(build)


def replica_zoo(kind: str, overrides: str, metric: str | None = None) -> Replica:
    """A replica over the tiny ``kind`` zoo (fusion_bench_pave.assets.tiny, built once in the cache):
    ``reference.paper_replicas.<overrides>`` gives its overrides (reference/paper_replicas.py)."""

    def build(root: Path, cfg) -> list[str]:
        from fusion_bench_pave.assets import ensure_zoo
        from reference import paper_replicas

        make = getattr(paper_replicas, overrides)
        zoo = ensure_zoo(f"tiny_{kind}")
        return make(zoo, cfg) if kind == "clip" else make(zoo, root, cfg)

    return Replica(build, metric)


def replica_openclip(root: Path, cfg) -> list[str]:
    """Tiny pickled open_clip encoders, heads and data built under ``root`` (reference/paper_replicas.py)."""
    from reference.paper_replicas import openclip_overrides

    return openclip_overrides(root, cfg)


#: family -> its tiny offline replica
REPLICAS: dict[str, Replica] = {
    "roberta-base_glue": replica_glue("roberta"),
    "gpt-2_glue": replica_glue("gpt2"),
    CLIP: replica_zoo("clip", "clip_overrides"),
    OPENCLIP: Replica(replica_openclip),
    "flan-t5-base_glue": replica_zoo("t5", "flan_t5_overrides"),
    "flan-t5-base_glue_lora16": replica_zoo("t5", "flan_t5_overrides"),
    "mistral-7b": replica_zoo("mistral", "causal_lm_overrides", metric="accuracy"),
    "qwen2.5-7b_math_code": replica_zoo("mistral", "causal_lm_overrides", metric="accuracy"),
}


def mean_over_tasks(report: dict, metric: str) -> float | None:
    """The evaluation's ``average.<metric>``, else the mean of the tasks' ``<metric>``; None if absent."""
    scores = evaluation(report)
    average = scores.get("average", {})
    if isinstance(average, dict) and isinstance(average.get(metric), (int, float)):
        return float(average[metric])
    values = [v[metric] for k, v in scores.items() if k != "average" and isinstance(v, dict) and metric in v]
    return sum(values) / len(values) if values else None


def log_of(sweep: Path) -> Path:
    """``<sweep>.log`` (a family's name may hold dots: qwen2.5-7b_math_code)."""
    return sweep.parent / f"{sweep.name}.log"


def run_family(presets: list[str], overrides: list[str], sweep: Path) -> subprocess.CompletedProcess:
    """``fusion_bench -m +preset=<presets> <overrides>`` with its jobs under ``sweep``; output in ``<sweep>.log``."""
    exe = Path(sys.executable).with_name("fusion_bench")
    command = [str(exe), "-m", f"+preset={','.join(presets)}", *overrides, f"hydra.sweep.dir={sweep}",
               "print_config=false"]
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=False)
    atomic_write_text(log_of(sweep), f"$ {' '.join(command)}\n{proc.stdout}\n{proc.stderr}")
    return proc


def job_of(sweep: Path, preset: str) -> Path | None:
    """The job directory of ``sweep`` that ran ``preset`` (reported or not), if any."""
    for job_dir in sorted(sweep.glob("[0-9]*")):
        overrides = job_dir / "overrides.yaml"
        if overrides.exists() and f"+preset={preset}" in overrides.read_text().split():
            return job_dir
    return None


def measure(rows: list[PaperRow], sweep: Path, proc: subprocess.CompletedProcess, metric: str | None = None) -> list[dict]:
    """One result per row: the measured figure (percent) from its job's report, or why there is none.
    ``metric``: the replica task pool's metric, read instead of the rows' own."""
    jobs = {job.overrides.get("+preset"): job for job in (load_jobs(sweep)[0] if sweep.is_dir() else [])}
    results = []
    for row in rows:
        result = {**asdict(row), "paper": row.figure or NOT_AVAILABLE, **({"metric": metric} if metric else {})}
        job = jobs.get(row.preset)
        if job is None:
            job_dir = job_of(sweep, row.preset)
            why = logged_error(job_dir) if job_dir else f"fusion_bench exited {proc.returncode} before this job"
            results.append({**result, "error": f"no report: {why} (log: {log_of(sweep)})"})
            continue
        value = mean_over_tasks(job.report, result["metric"]) if result["metric"] else None
        results.append({**result, "job_dir": str(sweep / job.name), "report": job.report,
                        "measured": None if value is None else 100 * value})
    return results


def cell(result: dict) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    if result["measured"] is None:
        return "not in FusionBench's report (lm-eval writes its own)" if result["metric"] is None else (
            f"no '{result['metric']}' in the report")
    return f"{result['measured']:.2f}"


def markdown(paper: str, replica: bool, results: list[dict]) -> str:
    title = f"# {paper.upper()} paper: its figures beside ours"
    note = ("Measured on tiny offline REPLICAS (random weights, random labels): the measured column tests "
            "the machinery and says nothing about the paper." if replica else
            "Measured with the presets as published (hub checkpoints and data).")
    lines = [title, "", note, "", "| preset | table | row | paper | measured |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r['preset']}` | {r['table']} | {r['row']} | {r['paper']} | {cell(r)} |")
    return "\n".join(lines) + "\n"


def family_settings(settings: list[str], family: str) -> list[str]:
    """The overrides of ``settings`` that apply to ``family``: plain ones and ``<family>:<override>``."""
    chosen = []
    for setting in settings:
        if ":" in setting.split("=", 1)[0]:
            target, setting = setting.split(":", 1)
            if target != family:
                continue
        chosen.append(setting)
    return chosen


def reproduce_paper(paper: str, out: Path, replica: bool = False, only: list[str] | None = None,
                    settings: list[str] | None = None) -> dict:
    """Run ``paper``'s presets (``only`` these, if given), family by family, and write ``out/results.md``
    and ``out/results.json``. ``settings``: CLI overrides for every family, or ``<family>:<override>``
    for one (e.g. ``roberta-base_glue:modelpool.finetuned_prefix=/data/roberta-glue/``)."""
    rows = [r for r in PAPERS[paper] if not only or r.preset in only]
    unknown = sorted(set(only or ()) - {r.preset for r in PAPERS[paper]})
    if unknown:
        raise ValueError(f"--only names presets that are not rows of the {paper} paper: {unknown}; "
                         f"its presets: {[r.preset for r in PAPERS[paper]]}")
    families = list(dict.fromkeys(r.family for r in rows))
    unknown = sorted({s.split(":", 1)[0] for s in settings or () if ":" in s.split("=", 1)[0]} - set(families))
    if unknown:
        raise ValueError(f"--set names families {unknown} that run no preset here; these run: {families}")
    taken = [str(out / "runs" / f) for f in families if (out / "runs" / f).exists()]
    if taken:
        raise FileExistsError(f"{taken} hold an earlier run; remove them or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.reproduce import compose  # (reproduce imports this module)

    results: list[dict] = []
    for family in families:
        members = [r for r in rows if r.family == family]
        if replica and family not in REPLICAS:
            results += [{**asdict(r), "paper": r.figure or NOT_AVAILABLE, "error": f"no offline replica of {family}"}
                        for r in members]
            continue
        overrides = family_settings(settings or [], family)
        cfg = compose([f"+preset={members[0].preset}"])  # a family's presets share one pool layout and method class
        if replica:
            overrides = [*REPLICAS[family].build(out / "replicas" / family, cfg), *overrides]
        if "cache_dir" in cfg.method and all(r.preset.startswith("pave_") for r in members):
            overrides.append(f"++method.cache_dir={out / 'cache' / family}")  # statistics collected once for the family
        sweep = out / "runs" / family
        metric = REPLICAS[family].metric if replica else None
        results += measure(members, sweep, run_family([r.preset for r in members], overrides, sweep), metric)
    summary = {"paper": paper, "replica": replica, "rows": results}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "results.md", markdown(paper, replica, results))
    return summary
