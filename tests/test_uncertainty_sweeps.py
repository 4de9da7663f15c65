"""Issue 16's uncertainty and prompt-loss-weight reports on REAL tiny-model sweeps (tests/test_report.py covers them on
synthetic run directories): each sweep trains and evaluates the tiny random model on the CPU under debug=default into
one run store (tests/test_experiments.py's way), then the report, given the sweep's own arguments, reads the per-item
outputs the eval stage kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import CONVERSATIONS
from tests.test_experiments import hydra_main

# debug=default trained on the fixture and evaluated on the tiny suite's ARC-Easy alone, on 24 questions instead of 4
# so that the random model's accuracy and its standard error are rarely zero; lm-eval's samples are the per-item
# scores. The suite's AlpacaEval judge would add minutes: tests/test_experiments.py runs it.
TINY = ["debug=default", f"data.path={CONVERSATIONS}", "data.converter=messages", "eval.only=[arc_easy]",
        "eval.harness.limit=24"]


def sweep_and_report(tmp_path, monkeypatch, experiment: str, *overrides: str) -> dict:
    """The experiment's multirun with these overrides into tmp_path/runs, then its report (the same arguments, comma
    lists included, as `make reproduce-<experiment> ARGS=...` gives both) into tmp_path/out; returns report.json."""
    from im_repro import report, run

    monkeypatch.setenv("IM_REPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # a failing job raises here instead of exiting
    monkeypatch.chdir(tmp_path)
    args = [f"experiment={experiment}", *TINY, *overrides, f"runs_dir={tmp_path / 'runs'}"]
    hydra_main(monkeypatch, run.main, "-m", *args)
    hydra_main(monkeypatch, report.main, *args, f"report.output_dir={tmp_path / 'out'}")
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["runs"] and all(r["status"] == "done" for r in summary["runs"]), summary["runs"]
    return summary


def lm_eval_results(run: str) -> dict:
    """lm-eval's own numbers for the run's ARC-Easy (its results.json)."""
    (path,) = Path(run).glob("eval/*/arc_easy/results.json")
    (results,) = json.loads(path.read_text())["results"].values()
    return results


@pytest.mark.slow
def test_table1_of_two_methods_and_two_seeds_has_standard_errors_and_paired_intervals(tmp_path, monkeypatch):
    summary = sweep_and_report(tmp_path, monkeypatch, "table1", "data=lima", "method=it,im", "seed=1,2")
    assert sorted((r["method"], r["seed"]) for r in summary["runs"]) == [("im", 1), ("im", 2), ("it", 1), ("it", 2)]
    assert "table1" in summary["written"], summary["skipped"]
    md = (tmp_path / "out" / "table1.md").read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| model |")).split(" | ")
    column = header.index("Commons.")  # ARC-Easy's category
    rows = {line.split(" | ")[2]: line.split(" | ") for line in lines if line.startswith("| tiny | conversations |")}
    assert set(rows) == {"it", "im"}, md
    for method, cells in rows.items():
        # Each row: the mean of its two seeds' lm-eval scores, their standard deviation and n, and the mean of
        # lm-eval's own standard errors.
        results = [lm_eval_results(r["path"]) for r in summary["runs"] if r["method"] == method]
        mean = sum(100 * r["acc_norm,none"] for r in results) / 2
        se = sum(100 * r["acc_norm_stderr,none"] for r in results) / 2
        assert cells[column].startswith(f"{mean:.2f} ± "), (method, cells[column])
        assert f"(n=2) [SE {se:.2f}]" in cells[column], (method, cells[column], se)
    # IM's difference from IT with its paired interval; a * after it or not is the data's call.
    assert re.search(r"\] \([+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]\*?\)$", rows["im"][column]), rows["im"]
    assert not re.search(r"\] \(", rows["it"][column])  # the reference row has no difference
    under = md.split("\n\n## Notes")[0].rsplit("\n\n", 1)[1]  # the paragraph right under the table
    assert under.startswith("± is the standard error") and "paired 95% interval" in under, under
    assert "* marks an interval that excludes zero" in under and "Across seeds: mean ± sample standard" in under


@pytest.mark.slow
def test_plw_figure_of_a_tiny_weight_sweep(tmp_path, monkeypatch):
    from im_repro.report import figures, load_runs
    from im_repro.report.collect import dig

    weights = (0.0, 0.1, 0.5, 1.0)  # four points: the fewest the quadratic fit's intervals allow
    summary = sweep_and_report(tmp_path, monkeypatch, "plw", "data=less_mmlu_chat",
                               f"method.prompt_loss_weight={','.join(map(str, weights))}")
    runs = load_runs(tmp_path / "runs")
    weight = {str(r.path): dig(r.config, "method.prompt_loss_weight") for r in runs}
    assert sorted(weight.values()) == list(weights) and len(summary["runs"]) == 4, weight
    assert "plw_categories" in summary["written"], summary["skipped"]
    assert (tmp_path / "out" / "plw_categories.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "out" / "plw_categories.pdf").read_bytes().startswith(b"%PDF")
    # What the files show, drawn again from the same runs: one panel (commonsense, ARC-Easy's category), its four
    # points lm-eval's scores, and the fit's coefficients with their intervals in the legend, or why there is no fit.
    fig = figures.plw_categories(runs, "it")
    (ax,) = fig.axes
    assert ax.get_title() == "commonsense"
    by_weight = {w: 100 * lm_eval_results(path)["acc_norm,none"] for path, w in weight.items()}
    x, y = ax.lines[0].get_xydata().T  # the error bar's points (its caps and the fitted curve come after)
    assert sorted(x) == list(weights) and list(y) == pytest.approx([by_weight[w] for w in x])
    (label,) = [t.get_text() for t in ax.get_legend().get_texts()]
    assert re.match(r"conversations: a=\S+ \[\S+, \S+\], b=\S+ \[\S+, \S+\], c=\S+$", label) or \
        label.startswith("conversations: no fit ("), label
