"""Every config composes against the schema; the entrypoint runs `prepare` end to end and records what it did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from tests.conftest import CONVERSATIONS, REPO, compose_with

CONF = REPO / "conf"


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,choice", [(g, c) for g in ("data", "model", "method", "train", "eval", "experiment") for c in choices(g)]
)
def test_every_config_composes_and_resolves(group, choice):
    cfg = compose_with(f"{group}={choice}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["name"] and resolved["model"]["path"] and "mask" in resolved["method"]


def test_misspelt_key_fails_at_start_up():
    with pytest.raises(ConfigCompositionException) as err:
        compose_with("data.limt=3")
    assert "limt" in str(err.value.__cause__ or err.value)
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        compose_with("data.on_invalid=ignore")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_with("method.mask=it_im")


def im_repro(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "IM_REPRO_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "im_repro", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_prepare_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    args = ["stages=[prepare]", "data=lima", f"data.path={CONVERSATIONS}", "data.limit=20", "model=tiny", "method=it",
            "train.max_seq_length=256", f"hydra.run.dir={run_dir}"]
    proc = im_repro(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    import datasets

    ds = datasets.load_from_disk(str(run_dir / "prepare" / "dataset"))
    stats = json.loads((run_dir / "prepare" / "data_stats.json").read_text())
    tok = stats["tokenization"]
    assert stats["data"]["kept"] == 20 and stats["length_stats"]["size"] == 20
    assert tok["kept"] == len(ds) == 20 - tok["dropped_no_supervision"] - tok["dropped_truncated_no_output"]
    assert tok["truncated"] > 0  # the fixture has instructions and answers longer than 256 tokens
    assert tok["dropped_no_supervision"] == tok["dropped_no_supervision_per_mode"]["it"]
    assert tok["dropped_no_supervision_per_mode"]["im"] <= tok["dropped_no_supervision"]
    assert all(len(x) <= 256 for x in ds["input_ids"]) and "labels" in ds.column_names

    manifest = json.loads((run_dir / "manifest.json").read_text())
    first = manifest["invocations"][0]
    assert first["status"] == "done" and first["stages"]["prepare"]["status"] == "done"
    assert first["config"]["method"]["mask"] == "it" and first["packages"]["transformers"]
    assert "commit" in first["git"] and f"data.path={CONVERSATIONS}" in first["overrides"]

    again = im_repro(*args, cwd=tmp_path)  # complete: reused, not redone
    assert again.returncode == 0 and "reused" in again.stderr + again.stdout


def test_bad_input_fails_before_writing_a_dataset(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                    '{"messages": [{"role": "robot"}]}\n')
    run_dir = tmp_path / "run"
    proc = im_repro("data=lima", f"data.path={data}", "model=tiny", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode != 0 and f"{data}:2: field 'messages[0].role'" in proc.stderr
    assert not (run_dir / "prepare" / "dataset").exists()
    assert json.loads((run_dir / "manifest.json").read_text())["invocations"][-1]["status"] == "failed"


def test_unknown_stage_is_refused(tmp_path):
    proc = im_repro("stages=[prepare,trian]", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode != 0 and "unknown ['trian']" in proc.stderr


@pytest.mark.parametrize("old,new", [
    ("method.loss=im", "use method.mask"), ("train.loss_normalization=per_token", "use method.reduction"),
    ("+method.normalize=nonzero_tokens", "use method.reduction"), ("stages=[prepare,loss]", "renamed heldout_loss"),
    ("skip_stages=[train]", "method=base"),
])
def test_a_renamed_key_is_named_with_its_new_name(old, new):
    from im_repro.config import renamed

    assert new in renamed([old]) and renamed(["method.mask=im", "stages=[prepare,heldout_loss]"]) is None


def test_a_renamed_key_fails_at_start_up(tmp_path):
    proc = im_repro("method=weighted", "method.normalize=nonzero_tokens", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode != 0 and "method.normalize was renamed; use method.reduction" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def test_prepare_with_workers_equals_one_process_and_reuses_its_cache(tmp_path, monkeypatch):
    import datasets

    from im_repro.run import execute

    monkeypatch.setenv("IM_REPRO_CACHE", str(tmp_path / "cache"))
    out = {}
    for procs in (1, 2):
        cfg = compose_with("data=lima", f"data.path={CONVERSATIONS}", "model=tiny", "method=im",
                           f"prepare.num_proc={procs}", "prepare.batch_size=4")
        execute(cfg, tmp_path / f"p{procs}", ["prepare"])
        out[procs] = datasets.load_from_disk(str(tmp_path / f"p{procs}" / "prepare" / "dataset")).to_dict()
    assert out[1] == out[2]
    cached = list((tmp_path / "cache" / "prepare").glob("*/encoded*.arrow"))
    assert len({p.parent for p in cached}) == 1  # one key: same data, tokenizer, template, mode, length

    cfg = compose_with("data=lima", f"data.path={CONVERSATIONS}", "model=tiny", "method=it")
    execute(cfg, tmp_path / "it", ["prepare"])  # another mode: another cache entry
    assert len({p.parent for p in (tmp_path / "cache" / "prepare").glob("*/encoded*.arrow")}) == 2


def test_show_tokens_colours_tokens_and_writes_html(tmp_path, capsys):
    from im_repro import show_tokens

    page = tmp_path / "x.html"
    show_tokens.main(["--index", "3", "--html", str(page), "data=lima", f"data.path={CONVERSATIONS}",
                  "model=tiny", "method=im"])
    printed = capsys.readouterr().out
    assert "lima[3] method=im" in printed and "\x1b[32;4;1m" in printed  # an output token, supervised
    html = page.read_text()
    assert 'class="t c0"' in html and 'class="t c1 s"' in html and 'class="t c2 s"' in html
    assert 'class="t c0 s"' not in html  # template tokens never carry the loss under IM
