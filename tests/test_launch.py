"""Job plans (dry runs) of the experiments, `make reproduce-*` expansions, and the multi-node accelerate command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from im_repro import launch, stages
from im_repro.common import UserError
from tests.conftest import REPO, compose_with

TABLE1_DATA = {"lima", "less_mmlu_chat", "less_bbh_icl", "less_tydiqa", "alpagasus_3k_dolly", "alpagasus_9k_dolly",
               "alpagasus_claude_t45_alpaca"}


def dry_run(tmp_path: Path, *overrides: str) -> list[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "im_repro", "-m", *overrides, "dry_run=true",
                          f"runs_dir={tmp_path}"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()


def test_table1_dry_run_lists_the_papers_jobs(tmp_path):
    lines = dry_run(tmp_path, "experiment=table1")
    jobs = [line.split() for line in lines[1:] if "__llama2_7b__" in line]
    runs = {tuple(j[0].split("__")[:3]) for j in jobs}  # <data>__<model>__<method>__<train>__seed<k>__<key>
    assert runs == {(d, "llama2_7b", m) for d in TABLE1_DATA for m in ("it", "neftune", "im")}
    assert Counter(j[1] for j in jobs) == {"prepare": 21, "train": 21, "eval": 21}
    train = next(j for j in jobs if j[1] == "train")
    assert train[2] == "prepare" and train[3:6] == ["1", "x", "4"]  # waits for prepare; 4 GPUs (the paper's)
    assert any(line.startswith("report table1") and "after the 21 runs" in line for line in lines)
    assert "21 runs, 64 jobs" in lines[-1]
    assert not list(tmp_path.glob("*/manifest.json"))  # nothing ran
    # eval GPU-hours per benchmark and per engine, from token counts; the eval jobs' hours are their sum on HF
    table = lines[lines.index(next(line for line in lines if line.startswith("eval GPU-hours"))) + 2:]
    rows = {r.split()[0]: r.split() for r in table[:table.index("")] if not r.startswith("  all on")}
    assert set(rows) == {*compose_with("eval=paper").eval.harness.tasks, "humaneval", "alpaca_eval", "mt_bench"}
    assert all(r[1] == "21" for r in rows.values())
    eval_jobs = sum(float(j[7]) for j in jobs if j[1] == "eval")
    assert eval_jobs == pytest.approx(sum(float(r[5]) for r in rows.values()), rel=0.02)  # each printed rounded
    assert float(rows["humaneval"][6]) < float(rows["humaneval"][5]) and rows["mmlu"][5] == rows["mmlu"][6]


@pytest.mark.slow  # two dry runs of 37 jobs: 58 s, too long for `make test`
def test_plw_dry_run_sweeps_the_prompt_loss_weight(tmp_path):
    lines = dry_run(tmp_path, "experiment=plw")
    jobs = [line.split() for line in lines[1:] if "__llama2_7b__" in line]
    runs = {tuple(j[0].split("__")[:3]) for j in jobs}
    assert runs == {(d, "llama2_7b", f"weighted{w}") for d in ("less_mmlu_chat", "alpagasus_claude_t45_alpaca")
                    for w in ("0.0", "0.01", "0.05", "0.1", "0.5", "1.0")}
    assert Counter(j[1] for j in jobs) == {"prepare": 12, "train": 12, "eval": 12}
    assert any(line.startswith("report plw") and "after the 12 runs" in line for line in lines)
    assert not list(tmp_path.glob("*/manifest.json"))
    # WIT's normalisation is a training setting: each weight's run under it has its own key
    other = dry_run(tmp_path, "experiment=plw", "method.reduction=per_example_nonzero")
    assert {line.split()[0] for line in other[1:] if "__llama2_7b__" in line}.isdisjoint(j[0] for j in jobs)


def test_dry_run_marks_finished_stages_and_estimates_gpu_hours(tmp_path):
    from im_repro import stages

    cfg = compose_with("model=llama2_7b", "stages=[prepare,train,eval]", "experiment=x", "train.epochs=2")
    run = tmp_path / "lima__llama2_7b__im__paper__seed42__abcdef"
    prepare = stages.plan(cfg, run, ["prepare"]).units["prepare"][0]
    prepare.begin(fresh=True)
    (run / "prepare" / "data_stats.json").write_text('{"tokenization": {"tokens": {"total": 1000000}}}')
    prepare.finish({})
    plan = launch.plan(cfg, run)
    prepare, train, _ = plan["stages"]
    assert prepare["state"] == "reused" and train["state"] == "to run"
    # 6 x 6.74e9 params x 1e6 tokens x 2 epochs at 40% of 312 TFLOP/s
    assert train["gpu_hours"] == pytest.approx(6 * 6.74e9 * 1e6 * 2 / (312e12 * 0.4) / 3600)
    assert train["basis"] == "prepared"
    assert "report" not in launch.format_plan([plan]).split("\n")[-2]  # no report tables asked for: no report job


@pytest.mark.parametrize("experiment", ["table1", "table2", "table3", "table4", "table5", "figure2", "figure2size",
                                        "figure3", "plw", "wit", "dft", "demo"])
def test_every_experiment_composes_with_a_sweep_and_a_report(experiment):
    cfg = compose_with(f"experiment={experiment}", hydra=True)
    assert cfg.experiment == experiment and cfg.hydra.sweeper.params
    assert cfg.report.tables or cfg.report.figures
    assert all(stage in cfg.launch.resources for stage in cfg.stages)


def test_reproduce_targets_expand_to_the_experiment_and_its_report():
    def make(*args):
        return subprocess.run(["make", "-n", *args], capture_output=True, text=True, cwd=REPO).stdout

    assert "-m im_repro -m experiment=table2 dry_run=true" in make("reproduce-table-2", "DRY_RUN=1")
    assert "-m im_repro -m experiment=plw dry_run=true" in make("reproduce-plw", "DRY_RUN=1")
    out = make("reproduce-table-7", "LAUNCHER=slurm")  # Table 7 is Table 3's sweep, in a train then an eval phase
    assert "experiment=table3 hydra/launcher=slurm launch.phase=train" in out
    assert out.index("launch.phase=train") < out.index("launch.phase=eval") < out.index("report experiment=table3")


def test_accelerate_command_for_one_node_of_a_multi_node_job():
    cfg = compose_with("launch.accelerate_config=conf/accelerate/multi_node_zero3.yaml")
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_JOB_NODELIST": "gpu03"}
    command = launch.accelerate_command(cfg, env, ["stages=[train]"])
    flags = dict(zip(command[3:-3:2], command[4:-3:2]))
    assert flags == {"--config_file": "conf/accelerate/multi_node_zero3.yaml", "--num_machines": "2",
                     "--num_processes": "16", "--machine_rank": "1", "--main_process_ip": "gpu03",
                     "--main_process_port": "29500"}
    assert command[-3:] == ["-m", "im_repro", "stages=[train]"]
    assert launch.accelerate_command(cfg, {**env, "LOCAL_RANK": "0"}, []) is None  # already under accelerate
    assert launch.accelerate_command(compose_with(), env, []) is None  # not configured


def test_slurm_phases_run_their_stages_on_their_resources():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    for phase, gpus, minutes in (("train", 4, 1440), ("eval", 1, 720)):
        cfg = compose_with("hydra/launcher=slurm", f"launch.phase={phase}", hydra=True)
        assert (cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.timeout_min) == (gpus, minutes)
    cfg = compose_with("stages=[prepare,train,eval,memorization]", "launch.phase=eval")
    assert stages.of_phase(cfg) == ["eval", "memorization"]
    with pytest.raises(UserError, match="launch.phase='test'"):
        stages.of_phase(compose_with("launch.phase=test"))


def test_base_method_evaluates_the_untuned_model_only():
    cfg = compose_with("experiment=table1", "method=base")
    assert stages.of_phase(cfg) == ["eval"]
    from im_repro import report

    run = report.collect.Run(Path("x"), None, {"method": {"name": "base"}, "data": {"name": "lima"}})
    assert report.identity(run)["dataset"] is None  # the base rows have no dataset


@pytest.mark.slow
def test_one_run_store_table4_and_table3_reuse_table1s_runs(tmp_path):
    """A tiny Table 1 sweep, then Table 4's plan reuses its IM runs, and Table 3's report finds its IT and IM
    baselines among them (one store, runs found by their settings)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                                     {"role": "assistant", "content": f"A{i}."}]}) + "\n"
                            for i in range(8)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IM_REPRO_CACHE": str(tmp_path / "cache")}
    common = ["model=tiny", "train=smoke", "train.max_steps=1", "train.save_strategy=no", "train.max_seq_length=64",
              "data=lima", f"data.path={data}", "stages=[prepare,train]", f"runs_dir={tmp_path / 'runs'}"]

    def im_repro(*args, module="im_repro"):
        proc = subprocess.run([sys.executable, "-m", module, *args, *common], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.splitlines()

    im_repro("-m", "experiment=table1")
    assert len(list((tmp_path / "runs").glob("data__tiny__*__smoke__seed42__*/train/_COMPLETE"))) == 3
    plan = im_repro("-m", "experiment=table4", "dry_run=true")
    states = {(line.split()[0].split("__")[2], line.split()[1]): line.split("  ")[-1].strip()
              for line in plan if line.startswith("data__tiny__")}
    assert states == {("im", "prepare"): "reused", ("im", "train"): "reused",
                      ("im_neftune", "prepare"): "to run", ("im_neftune", "train"): "to run"}

    im_repro("experiment=table3", f"report.output_dir={tmp_path / 'out'}", "hydra.sweeper.params.data=lima",
             module="im_repro.report")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    found = {(r["method"], r["kl_lambda"]): r["status"] for r in report["runs"]}
    assert found[("it", None)] == found[("im", None)] == "done"  # Table 1's runs, trained once
    assert found[("kl", 0.1)] is None  # never trained: its cells say "missing: run ... not found"
    assert "missing: run data__tiny__kl__smoke__seed42__" in report["skipped"]["table3"]  # and no eval ran


def test_eval_gpu_hours_come_from_the_suites_token_counts():
    cfg = compose_with("model=llama2_7b", "method=base", "stages=[eval]", "eval=paper", "eval.generation.backend=hf")
    total, work = launch.eval_hours(cfg, "eval")
    size, rate = cfg.launch.eval_sizes, cfg.launch.eval_throughput
    he = work["humaneval"]  # 164 problems x 20 samples x 2 temperatures, each prompt prefilled once
    assert he["documents"] == 164 and he["engine"] == "generation"
    assert he["generated"] == 164 * 20 * 2 * size.humaneval.generated_tokens
    assert he["scored"] == 164 * size.humaneval.example_tokens
    for backend in ("hf", "vllm"):
        seconds = he["scored"] / rate[backend].scored_tokens_per_s + he["generated"] / rate[backend].generated_tokens_per_s
        assert he[backend] == pytest.approx(seconds * 6.74 / 7 / 3600)
    arc = work["arc"]  # 25-shot: 26 examples in every prompt, one request per choice
    assert arc["scored"] == 3548 * 4 * 26 * size.ai2_arc.example_tokens and arc["generated"] == 0
    assert total == pytest.approx(sum(w["hf"] for w in work.values()))
    fewer = launch.eval_hours(compose_with("model=llama2_7b", "stages=[eval]", "eval=paper", "eval.humaneval.n=10",
                                           "eval.humaneval.limit=82", "eval.harness.tasks.arc.num_fewshot=0"), "eval")[1]
    assert fewer["humaneval"]["generated"] == he["generated"] / 4 and fewer["arc"]["scored"] == arc["scored"] / 26
    vllm = launch.eval_hours(compose_with("model=llama2_7b", "stages=[eval]", "eval=paper",
                                          "eval.generation.backend=vllm"), "eval")[0]
    assert vllm == pytest.approx(total - sum(w["hf"] - w["vllm"] for w in work.values() if w["engine"] == "generation"))
    unknown = launch.eval_hours(compose_with("model=llama2_7b", "stages=[eval]", "eval=smoke",
                                             "eval.harness.tasks.piqa.task=some_new_task"), "eval")[1]
    assert unknown["piqa"] == {"unknown": "no launch.eval_sizes.some_new_task"}


def test_the_token_weight_experiments_plan_their_runs(tmp_path, monkeypatch, capsys):
    from tests.test_edges import in_process

    status, out = in_process(monkeypatch, capsys, "-m", "experiment=wit", "dry_run=true", f"runs_dir={tmp_path}")
    names = {line.split()[0].split("__")[:3][2] for line in out.splitlines() if "__llama2_7b__" in line}
    assert status == 0 and names == {f"wit{p}_{r}" for p in ("0.0", "0.1", "0.5") for r in ("0.5", "1.0")}
    assert "12 runs, 37 jobs" in out
    status, out = in_process(monkeypatch, capsys, "-m", "experiment=dft", "data=lima", "dry_run=true",
                             f"runs_dir={tmp_path}")
    jobs = [line.split() for line in out.splitlines() if line.startswith("lima__llama2_7b__")]
    assert status == 0 and {j[0].split("__")[2] for j in jobs} == {"it", "im", "dft", "im_dft"}
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
