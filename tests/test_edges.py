"""What a user evaluates, runs and breaks is what the store and the screen say: runs named for what they score,
refusals before any work that write nothing, a sweep's account, one process per run folder, keys that cover what
changes an output, and messages instead of tracebacks for mistakes a user can make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from im_repro import config, keys, runs, stages
from im_repro.common import UserError
from im_repro.run import execute
from tests.conftest import CONVERSATIONS, REPO, compose_with

SMALL = ("model=tiny", "train=smoke", "train.max_seq_length=128", "train.global_batch_size=4",
         "train.per_device_batch_size=2", "train.save_strategy=no")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IM_REPRO_CACHE", str(tmp_path / "cache"))


def im_repro(tmp_path: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "IM_REPRO_CACHE": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "im_repro", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`im-repro args` in this process (no interpreter start-up): its exit status and what it printed."""
    from im_repro import run

    monkeypatch.setattr(sys, "argv", ["im-repro", *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        run.main()
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    captured = capsys.readouterr()
    return status, captured.out + captured.err


# ------------------------------------------------------------------------------------------ what is scored -----


def test_eval_before_train_is_refused_before_any_work_and_writes_nothing(tmp_path):
    cfg = compose_with("data=lima", f"data.path={CONVERSATIONS}", *SMALL, "method=im", "eval=tiny")
    with pytest.raises(UserError, match=r"eval needs the train stage's output.*stages=\[prepare,train,eval\]"):
        execute(cfg, tmp_path / "run", ["eval"])
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_is_its_own_run_named_and_keyed_for_what_it_is(tmp_path):
    run = tmp_path / "trained"
    execute(compose_with("data=lima", f"data.path={CONVERSATIONS}", "data.limit=8", *SMALL, "train.max_steps=1",
                         "method=it"), run, ["prepare", "train"])
    trained_key = json.loads((run / "train" / "_COMPLETE").read_text())["key"]
    final = run / "train" / "final"
    cfg = compose_with("stages=[eval]", f"eval.checkpoint={final}", "eval=tiny")
    assert stages.run_name(cfg).startswith("checkpoint__trained_train_final__seed42__")
    assert stages.plan(cfg, tmp_path / "x", ["eval"]).model.identity == {"train": trained_key, "dtype": "auto"}
    # a copy elsewhere is another folder of the same bytes: keyed by its content, whatever its path
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in final.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for f in final.iterdir():
        (elsewhere / f.name).write_bytes(f.read_bytes())
    ids = [stages.plan(compose_with("stages=[eval]", f"eval.checkpoint={p}"), tmp_path, ["eval"]).model.identity
           for p in (copy, elsewhere)]
    assert ids[0] == ids[1] and "checkpoint" in ids[0]
    with pytest.raises(UserError, match="scores a model as it is: stages prepare and train do not apply"):
        config.validate(compose_with(f"eval.checkpoint={final}", "stages=[prepare,train,eval]"))


def test_model_path_with_a_random_model_is_refused_naming_the_switch():
    cfg = compose_with("model=tiny", "model.path=runs/x/train/final")
    with pytest.raises(UserError, match=r"reads no weights from model.path=runs/x/train/final.*eval.checkpoint="):
        config.validate(cfg, ["model=tiny", "model.path=runs/x/train/final"])


# ------------------------------------------------------------------------------------------ keys ---------------


def benchmark_key(*overrides: str) -> str:
    cfg = compose_with("model=tiny", "method=base", "eval=tiny", *overrides)
    return {u.path.name: u.key for u in stages.plan(cfg, Path("run"), ["eval"]).units["eval"]}["arc_easy"]


def test_eval_dtype_changes_every_benchmark_key():
    assert benchmark_key("eval.dtype=float32") != benchmark_key("eval.dtype=bfloat16") != benchmark_key()


def test_a_borrowed_templates_content_changes_the_prepare_key(tmp_path):
    from im_repro import prepare

    template = "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + eos_token }}{% endfor %}"
    a, b = tmp_path / "a.jinja", tmp_path / "b.jinja"
    a.write_text(template)
    b.write_text("# another header\n" + template)

    def key(path):
        return keys.digest(prepare.settings(compose_with("model=tiny", f"model.chat_template={path}",
                                                         "prepare.template=chat_template")))

    assert key(a) != key(b)
    b.write_text(template)  # the same content under another name: the same data
    assert key(a) == key(b)


# ------------------------------------------------------------------------------------------ the run store ------


def test_one_process_at_a_time_in_a_run_folder(tmp_path):
    with runs.locked(tmp_path / "run"):
        with pytest.raises(UserError, match=rf"{tmp_path / 'run'} is in use by im-repro pid {os.getpid()}"):
            with runs.locked(tmp_path / "run"):
                pass
    with runs.locked(tmp_path / "run"):  # released: the next command goes ahead
        pass
    assert not list(tmp_path.iterdir())  # and nothing is left beside the folder


def test_two_processes_on_one_folder_train_once(tmp_path):
    args = ["stages=[prepare,train]", "data=lima", f"data.path={CONVERSATIONS}", "data.limit=16", *SMALL,
            "train.max_steps=6", "method=im", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "IM_REPRO_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-m", "im_repro", *args], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    refused = [o for o in outputs if "is in use by im-repro pid" in o]
    assert sorted(p.returncode for p in procs) == ([0, 2] if refused else [0, 0]), outputs
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 6]  # each step once, then the summary
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [i["status"] for i in manifest["invocations"]] == ["done"] * (2 - len(refused))


def test_a_benchmark_is_complete_as_soon_as_its_numbers_are_in(tmp_path, monkeypatch):
    from im_repro.evaluate import alpaca

    def judge_down(*_, **__):
        raise RuntimeError("the judge's machine went down")

    monkeypatch.setattr(alpaca, "run", judge_down)
    with pytest.raises(RuntimeError, match="went down"):
        execute(compose_with("model=tiny", "method=base", "eval=tiny"), tmp_path, ["eval"])
    assert (tmp_path / "eval" / "tiny" / "arc_easy" / "_COMPLETE").exists()  # lm-eval's benchmark ran first
    assert not (tmp_path / "eval" / "tiny" / "alpaca_eval" / "_COMPLETE").exists()


# ------------------------------------------------------------------------------------------ labels -------------


def test_a_users_file_is_named_for_itself_and_the_papers_copy_for_the_paper(tmp_path):
    mine = tmp_path / "My Data.jsonl"
    mine.write_text(CONVERSATIONS.read_text())
    assert stages.run_name(compose_with("data=lima", f"data.path={mine}")).startswith("My_Data__tiny__im__")
    lima = REPO.parent / "shared" / "data" / "paper" / "lima_data.jsonl"
    if lima.exists():  # its sha256 is the one conf/data/lima.yaml pins: the paper's LIMA, by any path
        assert stages.run_name(compose_with("data=lima", f"data.path={lima}")).startswith("lima__tiny__im__")


# ------------------------------------------------------------------------------------------ the screen ---------


def test_a_sweep_with_a_broken_job_ends_with_its_account_and_fails(tmp_path, monkeypatch, capsys):
    status, out = in_process(monkeypatch, capsys, "-m", "stages=[prepare]", "data=lima", f"data.path={CONVERSATIONS}",
                             "data.limit=0,4", "model=tiny", f"runs_dir={tmp_path / 'runs'}")
    assert status == 1
    assert "sweep: 2 jobs: 1 done, 0 reused, 1 failed" in out
    assert "stage start-up  UserError: settings out of range: data.limit=0" in out and "Traceback" not in out
    assert not (tmp_path / "runs" / ".sweeps").exists()


def test_a_dry_run_writes_nothing(tmp_path, monkeypatch, capsys):
    status, out = in_process(monkeypatch, capsys, "-m", "experiment=table1", "data=lima", "dry_run=true",
                             f"runs_dir={tmp_path / 'runs'}")
    assert status == 0 and "3 runs, 10 jobs" in out
    assert not list((tmp_path / "runs").glob("*"))  # no run folder (Hydra may have made runs/ itself)


def test_mistakes_are_messages_naming_the_fix(tmp_path, monkeypatch, capsys):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}]))
    run = f"hydra.run.dir={tmp_path / 'run'}"
    cases = [  # (arguments, message, refused at start-up: nothing written)
        ([run, "data.path=/nowhere/mine.jsonl"], "data.path=/nowhere/mine.jsonl: no such file", True),
        ([run, "data.limit=0"], "data.limit=0 (must be >= 1", True),
        (["runs_dir=/proc/im-repro-runs"], "runs_dir=/proc/im-repro-runs: cannot write to /proc", True),
        ([run, f"data.path={alpaca}"], "looks like the alpaca format: pass data.converter=alpaca", False),
        ([run, "model=llama2_7b", f"data.path={CONVERSATIONS}"], "pass model.path=<a local copy>", False),
    ]
    for args, message, at_start in cases:
        status, out = in_process(monkeypatch, capsys, "stages=[prepare]", *args)
        assert status != 0 and message in out and "Traceback" not in out, (args, out[-2000:])
        assert (tmp_path / "run").exists() != at_start  # else the manifest records the failed prepare


def test_a_checkpoint_folder_that_is_not_there_is_a_message_and_writes_nothing(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "runs" / "x" / "train" / "final"
    status, out = in_process(monkeypatch, capsys, "stages=[eval]", f"eval.checkpoint={missing}",
                             f"runs_dir={tmp_path / 'runs'}")
    assert status != 0 and f"eval.checkpoint={missing}: no such folder" in out and "Traceback" not in out, out[-2000:]
    assert not list((tmp_path / "runs").glob("*"))  # no run folder (Hydra may have made runs/ itself)


def test_offline_download_names_the_local_copy_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("urllib.request.urlretrieve", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    status, out = in_process(monkeypatch, capsys, "stages=[prepare]", "data=lima", f"hydra.run.dir={tmp_path / 'r'}")
    assert status == 2 and "Traceback" not in out
    assert "data.path=FILE" in out and "make demo DATA=FILE" in out


def test_cfg_job_prints_valid_yaml_under_wandb_offline(tmp_path):
    import yaml

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "im_repro", "--cfg", "job", "method=im"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["method"]["mask"] == "im"


def test_each_stage_ends_naming_its_outputs(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    cfg = compose_with("data=lima", f"data.path={CONVERSATIONS}", "data.limit=8", *SMALL, "train.max_steps=1",
                       "method=it", "eval=tiny")
    execute(cfg, tmp_path, ["prepare", "train", "eval"])
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("prepare: kept") and line.endswith(str(tmp_path / "prepare")) for line in lines)
    assert any(line.startswith("train: 1 optimizer steps") and line.endswith(str(tmp_path / "train" / "final"))
               for line in lines)
    assert any(line.startswith("eval: alpaca_eval: alpaca_eval_2.0/win_rate") for line in lines)
    assert lines[-1] == f"eval: metrics in {tmp_path / 'eval' / 'tiny' / 'metrics.json'}"
