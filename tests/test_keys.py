"""Stage keys: exactly the settings that can change an output. A finished stage is reused only under the same key;
another key is refused (naming each setting, old -> new) or, with force=true, recomputed from scratch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from im_repro import keys, stages, train
from im_repro.evaluate.suite import BENCHMARKS
from im_repro.run import execute
from im_repro.runs import StaleOutput
from tests.conftest import compose_with

# The settings left out of every key because they cannot change an output. A change here is a decision: review it.
NOT_IN_KEYS = {
    "data": ("name", "paper_name", "paper_size", "licence"),
    "model": ("name", "params_b"),
    "method": ("name",),
    "train": ("name", "logging_steps", "report_to", "save_strategy", "save_steps", "save_total_limit",
              "dataloader_num_workers", "gradient_checkpointing", "loss_kernel"),
    "prepare": ("num_proc", "batch_size", "cache_dir"),
    "harness": ("batch_size", "max_batch_size", "log_samples"),
    "humaneval": ("enabled", "workers", "category"),
    "alpaca_eval": ("enabled", "category", "judge.api_key_env", "judge.max_retries"),
    "mt_bench": ("enabled", "category", "judge.api_key_env", "judge.max_retries"),
    "arena_hard": ("enabled", "category", "judge.api_key_env", "judge.max_retries"),
    "analysis": ("batch_size",),
}  # and eval.only, eval.generation: in no key (the engine it chooses is: test_generation_keys)


def test_the_settings_left_out_of_the_keys():
    assert {**keys.EXCLUDED, **{kind: b.excluded for kind, b in BENCHMARKS.items()}} == NOT_IN_KEYS


def train_key(*overrides):
    return keys.digest(train.settings(compose_with("model=tiny", "train=smoke", *overrides)))


def arc_key(*overrides):
    cfg = compose_with("model=tiny", "method=base", "eval=smoke", *overrides)
    (unit,) = [u for u in stages.plan(cfg, Path("run"), ["eval"]).units["eval"] if u.path.name == "arc_easy"]
    return unit.key


@pytest.mark.parametrize("setting", ["train.logging_steps=7", "train.report_to=[wandb]", "train.save_steps=9",
                                     "prepare.num_proc=4", "data.paper_size=3", "train.kl.weight=0.5"])
def test_settings_that_cannot_change_the_model_keep_the_train_key(setting):
    assert train_key(setting) == train_key()  # kl.weight: no KL term (kl.mode=none) to weigh


@pytest.mark.parametrize("setting", ["train.learning_rate=0.5", "seed=1", "data.limit=5", "method=it",
                                     "train.max_seq_length=64", "train.neftune_alpha=5", "model.arch.hidden_size=32"])
def test_settings_that_change_the_model_change_the_train_key(setting):
    assert train_key(setting) != train_key()


def test_benchmark_keys():
    assert arc_key("eval.harness.batch_size=1", "eval.generation.batch_size=2") == arc_key()
    assert arc_key("eval.harness.limit=3") != arc_key()
    assert arc_key("eval.harness.tasks.arc_easy.num_fewshot=5") != arc_key()
    assert arc_key("eval.harness.tasks.hellaswag.limit=3") == arc_key()  # another benchmark's setting


def test_the_same_rows_from_a_file_or_from_their_url_are_one_run(tmp_path):
    lima = compose_with("data=lima")
    sha = lima.data.source.args.sha256
    copy = tmp_path / "lima.jsonl"
    copy.write_text('{"messages": []}\n')
    local = keys.data_settings(compose_with("data=lima", f"data.path={copy}"))
    assert local["rows"]["sha256"] != sha and keys.data_settings(lima)["rows"] == {"sha256": sha, "dataset_regex": None}


def test_run_directory_name():
    cfg = compose_with("data=alpagasus_3k_dolly", "model=smollm2", "method=weighted", "seed=3", "train=smoke",
                       hydra=True)
    name = cfg.hydra.run.dir.split("/")[-1]
    assert cfg.hydra.run.dir == f"runs/{name}"  # one store, whatever the experiment
    assert name == f"alpagasus_3k_dolly__smollm2__weighted0.5__smoke__seed3__{stages.run_name(cfg)[-6:]}"
    assert stages.run_name(cfg)[-6:] == keys.digest(train.settings(cfg, contents=False))[:6]
    assert compose_with("experiment=table1", "method=base", hydra=True).hydra.run.dir.startswith(
        "runs/base__llama2_7b__seed42__")


DATA = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(12)]
SMALL = ("model=tiny", "train=smoke", "train.max_seq_length=64", "train.global_batch_size=4",
         "train.per_device_batch_size=2", "train.max_steps=2", "train.save_strategy=steps", "train.save_steps=1")


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("IM_REPRO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DATA))
    return path


def stage(run, data, stages, *overrides):
    return execute(compose_with("data=lima", f"data.path={data}", *SMALL, *overrides), run, stages)


def test_prepare_reuses_refuses_and_recomputes(tmp_path, data):
    run = tmp_path / "run"
    assert stage(run, data, ["prepare"], "data.limit=8") == {"prepare": "fresh"}
    assert stage(run, data, ["prepare"], "data.limit=8", "prepare.num_proc=1") == {"prepare": "skip"}
    with pytest.raises(StaleOutput, match=r"prepare: .* data\.limit: 8 -> 6"):
        stage(run, data, ["prepare"], "data.limit=6")
    stats = json.loads((run / "prepare" / "data_stats.json").read_text())
    assert stats["data"]["kept"] == 8  # refused: nothing touched
    assert stage(run, data, ["prepare"], "data.limit=6", "force=true") == {"prepare": "fresh"}
    assert json.loads((run / "prepare" / "data_stats.json").read_text())["data"]["kept"] == 6
    assert stage(run, data, ["prepare"], "data.limit=6") == {"prepare": "skip"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert [i["status"] for i in manifest["invocations"]] == ["done"] * 4  # the refused command wrote nothing
    assert "data.limit=8" in manifest["invocations"][0]["overrides"] or manifest["invocations"][0]["config"]


def test_train_never_resumes_a_checkpoint_of_other_settings(tmp_path, data):
    run = tmp_path / "run"
    stage(run, data, ["prepare", "train"])
    first = json.loads((run / "train" / "_COMPLETE").read_text())
    # As if killed after its checkpoints (what Unit.begin leaves): resumable under the same key only.
    (run / "train" / "_STARTED").write_text(json.dumps({"key": first["key"], "settings": first["settings"]}))
    (run / "train" / "_COMPLETE").unlink()
    assert list((run / "train" / "checkpoints").iterdir())
    with pytest.raises(StaleOutput, match=r"train: .* train\.learning_rate: 0\.001 -> 0\.01"):
        stage(run, data, ["prepare", "train"], "train.learning_rate=1e-2")
    with pytest.raises(StaleOutput, match=r"train: .* prepare\.max_seq_length: 64 -> 32"):  # names the setting
        stage(run, data, ["train"], "train.max_seq_length=32", "force=false")
    actions = stage(run, data, ["prepare", "train"], "train.learning_rate=1e-2", "force=true")
    assert actions == {"prepare": "fresh", "train": "fresh"}
    second = json.loads((run / "train" / "_COMPLETE").read_text())
    assert second["resumed_from"] is None and second["global_step"] == 2  # trained from scratch
    assert second["key"] != first["key"] and second["train_loss"] != first["train_loss"]
    steps = [json.loads(line)["step"] for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # two steps and the summary: the old run's log was cleared with its folder
    assert stage(run, data, ["prepare", "train"], "train.learning_rate=1e-2", "train.logging_steps=5") == \
        {"prepare": "skip", "train": "skip"}
