"""The report stage on synthetic run directories: Table 1's numbers by hand, deltas, the paper beside ours, the
reasons for missing cells, provenance, Table 5 against the paper's LIMA row, and figures drawn only from data."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from im_repro.common import UserError
from im_repro import report
from im_repro.config import HarnessTask, ReportConfig
from im_repro.evaluate import harness, suite
from tests.conftest import compose_with

MODEL = "llama2_7b"
# The eval suite: benchmark -> Table 1 category, as eval/suite.json records it.
SUITE = {
    "mmlu": "knowledge", "piqa": "knowledge", "lambada_multilingual": "multilinguality", "wmt": "multilinguality",
    "arc": "commonsense", "gsm8k": "math_coding", "humaneval": "math_coding", "bbh": "bbh",
    "truthfulqa": "safety", "toxigen": "safety", "alpaca_eval": "llm_judged", "mt_bench": "llm_judged",
}
# IT's scores. Category means by hand: knowledge (60+70)/2 = 65, multilinguality (50+70)/2 = 60, commonsense 70,
# math_coding (10+20)/2 = 15, bbh 40, safety (40+50)/2 = 45; Mean = 295/6 = 49.1666...
IT_SCORES = {
    "mmlu": 60.0, "piqa": 70.0, "lambada_multilingual": 50.0, "wmt": 70.0, "arc": 70.0, "gsm8k": 10.0,
    "humaneval/pass@1": 20.0, "bbh": 40.0, "truthfulqa": 40.0, "toxigen": 50.0,
    "mt_bench/score": 5.0, "alpaca_eval_1.0/win_rate": 30.0, "alpaca_eval_2.0/win_rate": 2.5,
}
# IM: every NLP score one point up (so every category and the Mean +1), MT-Bench +0.5, AlpacaEval +3 and +0.5.
IM_SCORES = {k: v + 1 for k, v in IT_SCORES.items()} | {
    "mt_bench/score": 5.5, "alpaca_eval_1.0/win_rate": 33.0, "alpaca_eval_2.0/win_rate": 3.0,
}
NO_JUDGE = "not judged: OPENAI_API_KEY is not set"
OOM = "RuntimeError('CUDA out of memory')"
# The paper's Table 5 LIMA row as prepare's length_stats would hold it.
LIMA_STATS = {"size": 1030, "total": 484.47, "output": 442.75, "output_std": 491.34, "instruction": 41.72,
              "instruction_std": 79.28, "output_over_instruction": 10.6124, "instruction_over_output": 0.0942}
DOLLY_STATS = {"size": 2996, "total": 111.91, "output": 68.08, "output_std": 106.38, "instruction": 43.83,
               "instruction_std": 107.53, "output_over_instruction": 1.553, "instruction_over_output": 0.6439}


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def manifest(run: Path, config: dict, overrides: list[str], stages: dict, status: str = "done") -> None:
    """A manifest.json as runs.Manifest writes it: one invocation."""
    write(run / "manifest.json", {"run": run.name, "invocations": [{
        "status": status, "overrides": overrides, "config": config, "stages": stages,
        "git": {"commit": "0123456789abcdef", "dirty": True},
        "packages": {"torch": "2.13.0+cpu", "transformers": "5.23.0", "lm-eval": "0.4.13"}}]})


def suite_json(categories: dict[str, str], metric: str = "acc,none") -> dict:
    """eval/<suite>/suite.json as the eval stage records it: the registered benchmarks' own entries; any other name
    an lm-eval task of that category."""
    paper = suite.suite(compose_with("eval=paper"))

    def lm_eval_entry(name: str, category: str) -> dict:
        tasks = {"harness": {"tasks": {name: HarnessTask(task=name, metric=metric, category=category)}}}
        return harness.BENCHMARK.entry(OmegaConf.create(tasks), name)

    return {"suite": "paper", "benchmarks": {
        name: paper[name] if name in ("humaneval", "alpaca_eval", "mt_bench") else lm_eval_entry(name, category)
        for name, category in categories.items()}}


def make_run(root: Path, dataset: str, loss: str, *, scores: dict | None = None, missing: dict | None = None,
             failed: str | None = None, stats: dict | None = None, curve: bool = False) -> Path:
    """A run directory as the pipeline leaves it: manifest, prepare stats, train log, eval metrics and suite."""
    run = root / f"{dataset}__{MODEL}__{loss}__seed42"
    stages = {"prepare": {"status": "done"}, "train": {"status": "failed", "error": failed} if failed
              else {"status": "done"}}
    if scores is not None:
        stages["eval"] = {"status": "done"}
    manifest(run, {"data": {"name": dataset, "limit": None}, "model": {"name": MODEL},
                   "method": {"name": loss, "mask": loss}, "train": {"neftune_alpha": None, "kl": {"mode": "none"}},
                   "eval": {"name": "paper"}, "seed": 42, "experiment": "synth",
                   "stages": ["prepare", "train", "eval"]},
             [f"data={dataset}", f"method={loss}", "experiment=synth"], stages, "failed" if failed else "done")
    write(run / "prepare" / "data_stats.json", {"length_stats": stats or LIMA_STATS})
    if curve:
        records = [{"step": s, "epoch": s / 4, "loss": 2.0 - s / 10, "output_loss": 2.0 - s / 10,
                    "instruction_loss": 3.0 - s / 5 if loss == "im" else 3.0} for s in range(1, 5)]
        (run / "train").mkdir(parents=True)
        (run / "train" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if scores is not None:
        write(run / "eval" / "paper" / "metrics.json", {**scores, "missing": missing or {}})
        write(run / "eval" / "paper" / "suite.json", suite_json(SUITE))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """2 datasets x IT / IM: Dolly IT without AlpacaEval (no judge), Dolly IM failed in training."""
    root = tmp_path / "runs" / "synth"
    make_run(root, "lima", "it", scores=IT_SCORES, curve=True)
    make_run(root, "lima", "im", scores=IM_SCORES, curve=True)
    no_ae = {k: v for k, v in IT_SCORES.items() if not k.startswith("alpaca_eval")}
    reasons = {f"alpaca_eval_{v}/win_rate": NO_JUDGE for v in ("1.0", "2.0")}
    make_run(root, "alpagasus_3k_dolly", "it", scores=no_ae, missing={"alpaca_eval": json.dumps(reasons)},
             stats=DOLLY_STATS)
    make_run(root, "alpagasus_3k_dolly", "im", failed=OOM, stats=DOLLY_STATS)
    (root / "not_a_run").mkdir()  # e.g. Hydra's own folders: no manifest.json, ignored
    return tmp_path


def report_cfg(tmp_path: Path, **fields):
    return OmegaConf.create({"runs_dir": str(tmp_path / "runs"), "experiment": "synth",
                             "report": OmegaConf.structured(ReportConfig(output_dir=str(tmp_path / "out"), **fields))})


def run_report(tmp_path: Path, **fields) -> dict:
    """The report over every run folder the test made (the entry point selects them by the experiment's sweep)."""
    return report.run(report_cfg(tmp_path, **fields), report.load_runs(tmp_path / "runs" / "synth"))


def table_lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(line for line in path.read_text().splitlines() if not line.startswith("#")))


# Hand-computed: ours (difference from IT) on the "ours" line; the paper's LIMA row [ours - paper] below it.
GOLDEN_LIMA = """\
| llama2_7b | lima | it | ours | 65.00 | 60.00 | 70.00 | 15.00 | 40.00 | 45.00 | 49.17 | 5.00 | 30.00 | 2.50 |
|  |  |  | paper | 63.92 [+1.08] | 58.29 [+1.71] | 71.96 [-1.96] | 16.01 [-1.01] | 39.27 [+0.73] | \
43.29 [+1.71] | 48.79 [+0.38] | 4.77 [+0.23] | 33.06 [-3.06] | 2.58 [-0.08] |
| llama2_7b | lima | im | ours | 66.00 (+1.00) | 61.00 (+1.00) | 71.00 (+1.00) | 16.00 (+1.00) | 41.00 (+1.00) | \
46.00 (+1.00) | 50.17 (+1.00) | 5.50 (+0.50) | 33.00 (+3.00) | 3.00 (+0.50) |
|  |  |  | paper | 64.49 [+1.51] | 58.21 [+2.79] | 75.55 [-4.55] | 17.06 [-1.06] | 38.84 [+2.16] | \
43.45 [+2.55] | 49.60 [+0.57] | 4.83 [+0.67] | 32.94 [+0.06] | 2.47 [+0.53] |"""


def test_table1_markdown_csv_latex(runs: Path):
    summary = run_report(runs, tables=["table1"], label="synthetic test - not a reproduction")
    out = runs / "out"
    assert set(summary["written"]) == {"table1"} and not summary["skipped"]
    assert len(summary["runs"]) == 4  # the folder without a manifest is not a run

    md = (out / "table1.md").read_text()
    lines = md.splitlines()
    start = lines.index(GOLDEN_LIMA.splitlines()[0])
    assert lines[start:start + 4] == GOLDEN_LIMA.splitlines()
    # Dolly IT: NLP numbers, AlpacaEval marked with a note; Dolly IM: every cell marked, the training failure noted.
    dolly_it, dolly_im = table_lines(md, "| llama2_7b | alpagasus_3k_dolly |")
    assert "| 49.17 | 5.00 | n/a [1] | n/a [1] |" in dolly_it
    assert dolly_im.count("n/a [2]") == 10
    notes = md.split("## Notes")[1].split("## Provenance")[0]
    assert f"1. llama2_7b/alpagasus_3k_dolly/it (alpaca_eval_1, alpaca_eval_2): {NO_JUDGE}" in notes
    assert f"2. llama2_7b/alpagasus_3k_dolly/im (knowledge, multilinguality" in notes
    assert f"not run: train failed: {OOM}" in notes
    assert md.startswith("# Table 1") and "**synthetic test - not a reproduction**" in md

    rows = {(r["dataset"], r["method"]): r for r in read_csv(out / "table1.csv")}
    it, im = rows["lima", "it"], rows["lima", "im"]
    expected_it = {"knowledge": 65, "multilinguality": 60, "commonsense": 70, "math_coding": 15, "bbh": 40,
                   "safety": 45, "mean": 295 / 6, "mt_bench": 5, "alpaca_eval_1": 30, "alpaca_eval_2": 2.5}
    for column, value in expected_it.items():
        assert float(it[column]) == pytest.approx(value, abs=1e-6)
        assert it[f"{column}_delta"] == ""
    assert float(im["mean"]) == pytest.approx(295 / 6 + 1, abs=1e-6)
    assert float(im["mean_delta"]) == pytest.approx(1.0)
    assert float(im["alpaca_eval_1_delta"]) == pytest.approx(3.0)
    assert float(it["mean_paper"]) == 48.79 and float(it["mean_vs_paper"]) == pytest.approx(295 / 6 - 48.79, abs=1e-6)
    assert float(it["alpaca_eval_1_vs_paper"]) == pytest.approx(-3.06, abs=1e-6)
    assert rows["alpagasus_3k_dolly", "it"]["alpaca_eval_1"] == ""
    assert NO_JUDGE in rows["alpagasus_3k_dolly", "it"]["missing"]

    tex = (out / "table1.tex").read_text()
    begin, end = tex.index(r"\begin{tabular}{" + "l" * 14 + "}"), tex.index(r"\end{tabular}")
    assert begin < end and tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 1
    body = [line for line in tex[begin:end].splitlines() if line.endswith(r"\\")]
    assert all(len(re.findall(r"(?<!\\)&", line)) == 13 for line in body)  # every line has all 14 cells
    assert r"alpagasus\_3k\_dolly" in tex and "—" not in tex

    meta = json.loads((out / "table1.meta.json").read_text())  # the CSV's sidecar: the CSV itself is only data
    assert all(f"- {line}" in md for line in meta["provenance"]) and meta["suffixes"]["_delta_matched"]
    import pandas as pd

    frame = pd.read_csv(out / "table1.csv")
    assert len(frame) == 4 and {"mean_se", "mean_delta_matched", "mean_delta_items"} <= set(frame.columns)
    for text, mark in ((md, "- "), ("\n".join(f"# {line}" for line in meta["provenance"]), "# "), (tex, "% ")):
        assert f"{mark}label: synthetic test - not a reproduction" in text
        assert f"{mark}generated: " in text
        assert f"{mark}paper numbers: results/paper/table1.yaml" in text
        assert "lima__llama2_7b__it__seed42: status done; git 0123456789abcdef (dirty); overrides: data=lima" in text
        assert "packages: torch 2.13.0+cpu, transformers 5.23.0, lm-eval 0.4.13" in text


def test_paper_has_no_such_row(tmp_path: Path):
    root = tmp_path / "runs" / "synth"
    make_run(root, "lima", "weighted0.5", scores=IT_SCORES)
    run_report(tmp_path, tables=["table1"])
    paper_line = table_lines((tmp_path / "out" / "table1.md").read_text(), "|  |  |  | paper")[0]
    assert paper_line == "|  |  |  | paper" + " | —" * 10 + " |"


def test_table5_reproduces_the_papers_lima_row(runs: Path):
    run_report(runs, tables=["table5"])
    rows = {r["dataset"]: r for r in read_csv(runs / "out" / "table5.csv")}
    assert set(rows) == {"lima", "alpagasus_3k_dolly"}  # IT and IM share their training set: one row each
    lima = rows["lima"]
    for column in ("size", "total", "output", "output_std", "instruction", "instruction_std",
                   "output_per_instruction", "instruction_per_output"):
        assert float(lima[column]) == float(lima[f"{column}_paper"])
        assert float(lima[f"{column}_vs_paper"]) == pytest.approx(0.0, abs=1e-9)
    md = (runs / "out" / "table5.md").read_text()
    lima_line = next(line for line in md.splitlines() if line.startswith("| lima | — | ours"))
    assert lima_line.endswith("| 1030 | 484.47 | 442.75 | 491.34 | 41.72 | 79.28 | 10.6124 | 0.0942 |")
    assert "lima: every number is the mean of 2 runs" in md


def test_figures_from_data_and_skipped_without(runs: Path):
    summary = run_report(runs, figures=["curves", "figure2_ratio", "figure2_size", "loss_histograms"])
    out = runs / "out"
    for name in ("curves", "figure2_ratio", "figure2_size"):  # LIMA has IT and IM AlpacaEval 1.0
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.pdf").stat().st_size > 0
    assert "per-example losses" in summary["skipped"]["loss_histograms"]
    assert not (out / "loss_histograms.png").exists()
    saved = json.loads((out / "report.json").read_text())
    assert saved["skipped"] == summary["skipped"] and "curves" in saved["written"]
    assert "loss_histograms" in (out / "summary.md").read_text()

    points = report.figure2_points(report.load_runs(runs / "runs" / "synth"), "it", "instruction_per_output")
    assert [(p.label, p.x, p.gain) for p in points] == [("lima (llama2_7b)", 0.0942, pytest.approx(10.0))]


def test_figure2_without_data_writes_nothing(tmp_path: Path):
    root = tmp_path / "runs" / "synth"
    make_run(root, "lima", "it", scores=IT_SCORES)
    make_run(root, "lima", "im", failed=OOM)
    out = tmp_path / "out"
    out.mkdir()
    (out / "figure2_ratio.png").write_bytes(b"stale")  # from an earlier report: must not pass for this one
    summary = run_report(tmp_path, figures=["figure2_ratio"], tables=["table2"])
    assert summary["skipped"]["figure2_ratio"].startswith("no model and dataset has AlpacaEval 1.0 win rates")
    assert f"lima/im AlpacaEval 1.0: not run: train failed: {OOM}" in summary["skipped"]["figure2_ratio"]
    assert not list(out.glob("figure2_ratio.*"))
    assert summary["skipped"]["table2"].startswith("no run has a value: memorization not run")


def test_loss_table_and_histograms(tmp_path: Path):
    root = tmp_path / "runs" / "synth"
    for loss, (train, test) in {"it": (1.37, 1.32), "im": (1.45, 1.17)}.items():
        run = make_run(root, "lima", loss)
        write(run / "heldout_loss" / "summary.json", {"train": {"mean": train, "n": 2}, "test": {"mean": test, "n": 2}})
        for split, mean in (("train", train), ("test", test)):
            (run / "heldout_loss" / f"{split}.jsonl").write_text(
                "".join(json.dumps({"loss": mean + d}) + "\n" for d in (-0.1, 0.1)))
    summary = run_report(tmp_path, tables=["losses"], figures=["loss_histograms"])
    assert set(summary["written"]) == {"losses", "loss_histograms"}
    rows = {r["method"]: r for r in read_csv(tmp_path / "out" / "losses.csv")}
    assert float(rows["im"]["test_loss_delta"]) == pytest.approx(1.17 - 1.32)
    assert float(rows["im"]["train_loss_vs_paper"]) == pytest.approx(0.0)


def test_seeds_are_reported_as_mean_std_and_count(tmp_path: Path):
    root = tmp_path / "runs" / "synth"
    for seed, shift in ((1, -1.0), (2, 0.0), (3, 1.0)):
        run = make_run(root, "lima", "it", scores={k: v + shift for k, v in IT_SCORES.items()})
        record = json.loads((run / "manifest.json").read_text())
        record["invocations"][0]["config"]["seed"] = seed
        write(run / "manifest.json", record)
        run.rename(root / f"lima__{MODEL}__it__seed{seed}")
    run_report(tmp_path, tables=["table1"])
    row = read_csv(tmp_path / "out" / "table1.csv")[0]
    assert float(row["mean"]) == pytest.approx(295 / 6) and float(row["mean_std"]) == pytest.approx(1.0)
    assert row["mean_n"] == "3"
    assert "| 49.17 ± 1.00 (n=3) |" in (tmp_path / "out" / "table1.md").read_text()


def test_unknown_names_and_no_runs_fail_loudly(tmp_path: Path):
    with pytest.raises(UserError, match="unknown \\['table9'\\]"):
        run_report(tmp_path, tables=["table9"])
    with pytest.raises(UserError, match="none of the 0 runs"):
        run_report(tmp_path, tables=["table1"])


# --- uncertainty: standard errors, paired intervals, significance marks (im_repro.stats) -------------------------

CATEGORY_OF = {"mmlu": "knowledge", "xnli": "multilinguality", "arc": "commonsense", "gsm8k": "math_coding",
               "bbh": "bbh", "truthfulqa": "safety"}


def make_item_run(root: Path, method: str, seed: int, correct: dict[str, "np.ndarray"],
                  weight: float | None = None) -> None:
    """A run as the eval stage leaves it with lm-eval's per-document samples: one task per category, 0/1 acc."""
    import numpy as np

    run = root / f"lima__{MODEL}__{method}__seed{seed}"
    mask = "weighted" if weight is not None else method
    where = run / "eval" / "paper"
    manifest(run, {"data": {"name": "lima", "limit": None}, "model": {"name": MODEL},
                   "method": {"name": method, "mask": mask, "prompt_loss_weight": weight},
                   "train": {"neftune_alpha": None, "kl": {"mode": "none"}},
                   "eval": {"name": "paper"}, "seed": seed, "experiment": "synth"},
             [f"method={method}", f"seed={seed}"],
             {"prepare": {"status": "done"}, "train": {"status": "done"}, "eval": {"status": "done"}})
    metrics = {}
    for task, right in correct.items():
        acc = float(np.mean(right))
        metrics[task] = 100 * acc
        rows = [{"doc_id": i, "filter": "none", "acc": float(v)} for i, v in enumerate(right)]
        (where / task).mkdir(parents=True)
        (where / task / f"samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        stderr = float(np.std(right, ddof=1) / np.sqrt(len(right)))  # what lm-eval's mean_stderr computes
        write(where / task / "results.json",
              {"results": {task: {"acc,none": acc, "acc_stderr,none": stderr}}})
    write(where / "metrics.json", {**metrics, "missing": {}})
    write(where / "suite.json", suite_json(CATEGORY_OF))


def test_table1_over_two_methods_and_two_seeds_carries_uncertainty(tmp_path):
    """IT and IM, two seeds each, 300 documents per task: IM gets 15% more of the knowledge documents right (its
    interval must exclude zero and be marked), the same documents elsewhere (difference 0, not marked)."""
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "runs" / "synth"
    base = {t: rng.random(300) < 0.5 for t in CATEGORY_OF}
    for seed in (1, 2):
        make_item_run(root, "it", seed, base)
        lifted = base["mmlu"] | (rng.random(300) < 0.3)
        make_item_run(root, "im", seed, base | {"mmlu": lifted})
    out = run_report(tmp_path, tables=["table1"])
    assert out["skipped"] == {}
    md = (tmp_path / "out" / "table1.md").read_text()
    it_line, im_line = table_lines(md, f"| {MODEL} | lima |")
    se = 100 * np.std(base["mmlu"], ddof=1) / np.sqrt(300)
    assert f"{100 * base['mmlu'].mean():.2f} ± 0.00 (n=2) [SE {se:.2f}]" in it_line
    knowledge, multiling = im_line.split(" | ")[4:6]
    assert re.search(r"\(\+\d+\.\d\d \[\+\d+\.\d\d, \+\d+\.\d\d\]\*\)", knowledge), knowledge
    assert "(+0.00 [+0.00, +0.00])" in multiling
    assert "paired 95% interval" in md and "scipy.stats.bootstrap (BCa, 10000 resamples" in md

    rows = {r["method"]: r for r in read_csv(tmp_path / "out" / "table1.csv")}
    im = rows["im"]
    assert float(im["knowledge_delta"]) == pytest.approx(float(im["knowledge"]) - float(rows["it"]["knowledge"]))
    assert float(im["knowledge_std"]) > 0 and im["knowledge_n"] == "2"  # the two IM seeds lifted different documents
    assert float(im["knowledge_delta_low"]) > 0 and im["knowledge_delta_significant"] == "1"
    assert im["multilinguality_delta_significant"] == "0" and float(rows["it"]["knowledge_se"]) == pytest.approx(se)
    assert r"paired 95\% interval" in (tmp_path / "out" / "table1.tex").read_text()


def test_plw_figure_draws_score_against_weight_with_the_quadratic_fit(tmp_path):
    import numpy as np

    rng, root = np.random.default_rng(1), tmp_path / "runs" / "synth"
    for w in (0.0, 0.01, 0.05, 0.1, 0.5, 1.0):  # accuracy peaks at a small weight, as Huerta-Enochian & Ko found
        p = 0.5 + 0.2 * w - 0.3 * w * w
        make_item_run(root, f"weighted{w}", 1, {t: rng.random(200) < p for t in CATEGORY_OF}, weight=w)
    out = run_report(tmp_path, figures=["plw_categories"])
    assert out["skipped"] == {} and (tmp_path / "out" / "plw_categories.png").stat().st_size > 0
    assert report.run(report_cfg(tmp_path, figures=["plw_categories"]),
                      report.load_runs(tmp_path / "runs" / "synth")[:2])["skipped"] == {}  # too few weights: no fit, said


def test_an_interval_over_fewer_items_than_the_cells_is_shown_with_its_own_difference():
    """Seen in the CPU demo: IM's AlpacaEval lacked one judge annotation, so the cells' difference (-3.40) and the
    paired interval over the 11 matched items ([-0.77, +0.20]) disagreed when printed together."""
    from types import SimpleNamespace

    from im_repro.report.render import difference
    from im_repro.stats import Difference

    d = Difference(difference=-0.19, low=-0.77, high=0.20, n=11, unmatched=1, confidence=0.95)
    row = SimpleNamespace(delta={"ae2": -3.40}, interval={"ae2": d})
    assert difference(row, "ae2", 2) == " (-3.40; over 11 matched items -0.19 [-0.77, +0.20], 1 unmatched)"
    row.interval["ae2"] = Difference(difference=-3.40, low=-5.0, high=-1.0, n=12, unmatched=0, confidence=0.95)
    assert difference(row, "ae2", 2) == " (-3.40 [-5.00, -1.00]*)"
