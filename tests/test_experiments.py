"""Every experiment config (conf/experiment/*.yaml, globbed: a new one is covered by being added) composed and run end
to end on the CPU under debug=default: its multirun (prepare -> train -> eval or the analyses, whatever its stages)
into a run store of its own, then its report. Table 3's report must fill its IT and IM baseline rows from runs of the
store. (That Table 3 and Table 4 reuse Table 1's runs from one store is tests/test_launch.py's.)"""

from __future__ import annotations

import csv
import json
import sys

import pytest

from tests.conftest import CONVERSATIONS, REPO, compose_with

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))

# What the test adds to debug=default, and why:
OFFLINE = [
    # Every dataset is read from the fixture instead of its source (LIMA's and AlpaGasus' URLs, LESS's zip, the Hub),
    # as messages whatever the dataset's own converter (the fixture is in the messages format).
    f"data.path={CONVERSATIONS}", "data.converter=messages",
    # Figure 3's held-out set (Tulu V2, from the Hub): the fixture again; its first 16 rows are the training rows and
    # are de-duplicated away, which leaves 8 to score.
    f"analysis.heldout.path={CONVERSATIONS}",
    # Only the tiny suite's AlpacaEval (local prompts, local judge): its lm-eval task costs two builds of lm-eval's
    # task index per evaluated run (~40 s each on 2 cores), and tests/test_evaluate.py runs that path.
    "eval.only=[alpaca_eval]",
]


def cut(params) -> list[str]:
    """One run per method: every other swept key (data, KL weight, subset size...) at its first value."""
    return [f"{key}={str(values).split(',')[0]}" for key, values in params.items() if key != "method"]


def hydra_main(monkeypatch, main, *args: str) -> None:
    """An im-repro command in this process (the package imports once, not once per command)."""
    monkeypatch.setattr(sys, "argv", ["im-repro", *args])
    main()


def rows(path) -> list[dict]:
    return list(csv.DictReader(line for line in path.read_text().splitlines() if not line.startswith("#")))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)  # one test each, so test workers share them out
def test_every_experiment_runs_end_to_end_under_debug(experiment, tmp_path, monkeypatch):
    from im_repro import report, run

    monkeypatch.setenv("IM_REPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # a failing job raises here instead of exiting
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "runs"
    cfg = compose_with(f"experiment={experiment}", "debug=default", hydra=True)
    overrides = [f"experiment={experiment}", "debug=default", *OFFLINE, *cut(cfg.hydra.sweeper.params),
                 f"runs_dir={store}"]
    hydra_main(monkeypatch, run.main, "-m", *overrides)
    out = tmp_path / "results" / experiment
    hydra_main(monkeypatch, report.main, *overrides, f"report.output_dir={out}")

    summary = json.loads((out / "report.json").read_text())
    assert summary["runs"] and all(r["status"] == "done" for r in summary["runs"]), summary["runs"]
    # Every table and figure is written or says why not: Table 4 and Figure 2 need AlpacaEval 1.0, whose judge
    # the tiny suite leaves out (it would double the judging), and the Mean needs all six categories.
    assert set(summary["written"]) | set(summary["skipped"]) == {*cfg.report.tables, *cfg.report.figures}
    assert all(summary["skipped"].values()), summary["skipped"]
    if experiment != "table3":
        return
    # Table 3's IT and IM rows are runs of the store (Table 1's, where it ran there first), evaluated: their
    # AlpacaEval 2.0 cells are filled; the Mean needs all six categories, which the tiny suite does not have, and
    # says so.
    table3 = {(r["method"], r["kl_lambda"]): r for r in rows(out / "table3.csv")}
    assert set(table3) == {("it", ""), ("im", ""), ("kl", "0.01")}
    for method in ("it", "im", "kl"):
        row = next(r for (m, _), r in table3.items() if m == method)
        assert row["alpaca_eval_2"] and 0 <= float(row["alpaca_eval_2"]) <= 100, row
        assert not row["mean"] and "mean: needs all six categories" in row["missing"], row
    baselines = {table3[(m, "")]["runs"] for m in ("it", "im")}
    assert all(b.startswith(str(store / "conversations__tiny__")) for b in baselines)


def test_the_paper_experiments_are_all_there():
    assert {"table1", "table3", "figure3"} <= set(EXPERIMENTS)
