"""SLURM: the submitit launcher configs (conf/hydra/launcher/), cheaply, and a real sweep through SLURM.

The cheap tests compose each launcher config and render the sbatch script submitit would submit. The `slurm` test
submits a two-run CPU sweep (IT and IM on the tiny model) through hydra/launcher=slurm_local to a real cluster:
one that `sinfo` already reaches, or else the one-node cluster of scripts/slurm_local.sh, started (as root only)
and stopped again by the module fixture. Without either it is skipped, with the reason.
IM_REPRO_SLURM_TEST_DIR puts its files on a filesystem the compute nodes see (default: pytest's tmp_path, which is
enough for the local cluster).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest

from im_repro.runs import latest
from tests.conftest import ARTIFACTS, REPO

SCRIPT = REPO / "scripts" / "slurm_local.sh"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


# --------------------------------------------------------------------------------------------- composition (cheap)


@pytest.fixture
def conf_dir(tmp_path) -> Path:
    """A copy of conf/ without any site file, so that a user's conf/hydra/launcher/site/ cannot change the answers."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]' (hydra-submitit-launcher)")
    dest = tmp_path / "conf"
    shutil.copytree(REPO / "conf", dest, ignore=shutil.ignore_patterns("site"))
    return dest


def launcher(conf: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    import im_repro.run  # noqa: F401  (registers the schema and the artifacts resolver)

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra.launcher


def sbatch_text(params, tmp_path: Path, monkeypatch) -> str:
    """The sbatch script submitit writes for these launcher parameters (the launcher's own mapping, no cluster).

    submitit's SlurmExecutor refuses to exist where `srun` is not on the PATH (its `affinity`); rendering the script
    needs no cluster, so the test alone tells it one is there.
    """
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    params = {k: v for k, v in params.items() if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    params["name"] = "im_repro"
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit")
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("CMD", "uid")


def test_slurm_launcher_one_node(conf_dir, tmp_path, monkeypatch):
    cfg = launcher(conf_dir, "hydra/launcher=slurm")
    assert cfg._target_ == SLURM_LAUNCHER
    assert (cfg.nodes, cfg.tasks_per_node, cfg.gpus_per_node) == (1, 1, 4)
    assert cfg.partition is None and cfg.account is None and cfg.qos is None  # the cluster's defaults
    assert (cfg.cpus_per_task, cfg.mem_gb, cfg.timeout_min, cfg.array_parallelism) == (32, 256, 1440, 8)
    text = sbatch_text(cfg, tmp_path, monkeypatch)
    for line in ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=4", "--cpus-per-task=32", "--mem=256GB",
                 "--time=1440"):
        assert f"#SBATCH {line}\n" in text, text
    assert "--partition" not in text


def test_slurm_launcher_multinode(conf_dir, tmp_path, monkeypatch):
    cfg = launcher(conf_dir, "hydra/launcher=slurm_multinode")
    assert cfg._target_ == SLURM_LAUNCHER
    assert (cfg.nodes, cfg.tasks_per_node, cfg.gpus_per_node, cfg.array_parallelism) == (2, 1, 4, 8)
    cfg = launcher(conf_dir, "hydra/launcher=slurm_multinode", "hydra.launcher.nodes=4", "hydra.launcher.gpus_per_node=8")
    text = sbatch_text(cfg, tmp_path, monkeypatch)
    assert "#SBATCH --nodes=4\n" in text and "#SBATCH --ntasks-per-node=1\n" in text and "--gpus-per-node=8" in text


def test_slurm_launcher_local(conf_dir, tmp_path, monkeypatch):
    cfg = launcher(conf_dir, "hydra/launcher=slurm_local")
    assert cfg._target_ == SLURM_LAUNCHER
    assert (cfg.partition, cfg.nodes, cfg.tasks_per_node, cfg.gpus_per_node) == ("debug", 1, 1, None)
    assert (cfg.cpus_per_task, cfg.mem_gb, cfg.array_parallelism) == (1, 4, 2)
    assert cfg.timeout_min <= 30
    text = sbatch_text(cfg, tmp_path, monkeypatch)
    assert "#SBATCH --partition=debug\n" in text and "gpus" not in text


def test_launcher_overrides_and_parallelism(conf_dir):
    cfg = launcher(conf_dir, "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.array_parallelism=3",
                   "hydra.launcher.timeout_min=30", "+hydra.launcher.additional_parameters.mail-type=END")
    assert (cfg.partition, cfg.array_parallelism, cfg.timeout_min) == ("gpu", 3, 30)
    assert cfg.additional_parameters == {"mail-type": "END"}


def test_site_file_overrides_launcher_defaults(conf_dir):
    """conf/hydra/launcher/site/local.yaml (git-ignored) holds the cluster's values; the command line still wins."""
    site = conf_dir / "hydra" / "launcher" / "site"
    site.mkdir()
    (site / "local.yaml").write_text("partition: gpu\naccount: proj42\nqos: normal\ngpus_per_node: 8\n"
                                     "setup:\n  - module load cuda\n")
    cfg = launcher(conf_dir, "hydra/launcher=slurm")
    assert (cfg.partition, cfg.account, cfg.qos, cfg.gpus_per_node) == ("gpu", "proj42", "normal", 8)
    assert list(cfg.setup) == ["module load cuda"]
    cfg = launcher(conf_dir, "hydra/launcher=slurm_multinode", "hydra.launcher.partition=big")
    assert (cfg.partition, cfg.account, cfg.gpus_per_node, cfg.nodes) == ("big", "proj42", 8, 2)
    cfg = launcher(conf_dir, "hydra/launcher=slurm_local")  # the local test cluster ignores the site file
    assert (cfg.partition, cfg.account, cfg.gpus_per_node) == ("debug", None, None)


def test_site_file_typo_fails(conf_dir):
    from hydra.errors import ConfigCompositionException

    site = conf_dir / "hydra" / "launcher" / "site"
    site.mkdir()
    (site / "local.yaml").write_text("partiton: gpu\n")
    with pytest.raises(ConfigCompositionException, match="partiton"):
        launcher(conf_dir, "hydra/launcher=slurm")


def test_sbatch_templates_parse():
    for path in sorted((REPO / "slurm").glob("*.sbatch")):
        subprocess.run(["bash", "-n", str(path)], check=True)
        assert "#SBATCH --job-name=" in path.read_text(), path


# ------------------------------------------------------------------------------------------------ a real cluster


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _default_partition() -> str | None:
    """The partition sbatch uses by default, if a slurmctld answers: `sinfo -o %P` marks it with a '*'."""
    if not shutil.which("sinfo"):
        return None
    try:
        proc = _run(["sinfo", "-h", "-o", "%P %a"], timeout=20)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    up = [name for name, avail in rows if avail == "up"]
    default = [name.rstrip("*") for name in up if name.endswith("*")]
    return (default or [name.rstrip("*") for name in up] or [None])[0]


@pytest.fixture(scope="module")
def slurm_partition():
    """A partition of a working SLURM cluster; starts scripts/slurm_local.sh's cluster (root only) if none answers."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]' (hydra-submitit-launcher)")
    partition = _default_partition()
    if partition:
        yield partition
        return
    why = "sinfo is not installed" if not shutil.which("sinfo") else "sinfo gets no answer from a slurmctld"
    if os.geteuid() != 0:
        pytest.skip(f"no SLURM cluster ({why}) and starting the local one needs root: sudo {SCRIPT} start")
    try:
        proc = _run(["bash", str(SCRIPT), "start"], timeout=900)  # may apt-get install munge and slurm first
    except subprocess.TimeoutExpired:
        pytest.skip(f"no SLURM cluster ({why}) and `{SCRIPT} start` did not finish in 900 s")
    if proc.returncode != 0:
        pytest.skip(f"no SLURM cluster ({why}) and `{SCRIPT} start` failed: {(proc.stdout + proc.stderr)[-2000:]}")
    partition = _default_partition()
    if not partition:
        _run(["bash", str(SCRIPT), "stop"])
        pytest.skip(f"`{SCRIPT} start` succeeded but sinfo shows no partition that is up")
    try:
        yield partition
    finally:
        _run(["bash", str(SCRIPT), "stop"], timeout=120)


def write_conversations(path: Path, n: int = 16) -> Path:
    with path.open("w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"Question {i}: what is {i} plus {i}? Explain briefly."},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}: adding a number to itself doubles it."},
            ]
            if i % 2:
                messages += [{"role": "user", "content": "And times two?"},
                             {"role": "assistant", "content": f"Also {2 * i}."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def sweep(partition: str, data: Path, runs: Path, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "im_repro", "-m", "hydra/launcher=slurm_local", f"hydra.launcher.partition={partition}",
           "stages=[prepare,train]", "model=tiny", "train=smoke", "data=lima", f"data.path={data}", "data.limit=16",
           "method=it,im", f"runs_dir={runs}"]
    start = time.monotonic()
    # The jobs run from the repository (sbatch's working directory is the submitter's) with this environment
    # (sbatch exports it) and this interpreter (submitit runs sys.executable).
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    return proc, time.monotonic() - start


def job_logs(runs: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(runs.rglob(".submitit/*/*_log.*")))


def seconds(stage: dict) -> float:
    return (datetime.fromisoformat(stage["ended"]) - datetime.fromisoformat(stage["started"])).total_seconds()


@pytest.mark.slurm
def test_sweep_through_slurm(slurm_partition, tmp_path):
    base = Path(os.environ.get("IM_REPRO_SLURM_TEST_DIR", tmp_path))
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="im-repro-slurm-", dir=base))
    data = write_conversations(work / "conversations.jsonl")
    runs = work / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "IM_REPRO_ARTIFACTS": str(ARTIFACTS), "IM_REPRO_CACHE": str(work / "cache"),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_JOB_ID", "SLURM_JOBID"):  # not a rank of anything here
        env.pop(name, None)

    proc, first = sweep(slurm_partition, data, runs, env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + job_logs(runs)
    run_dirs = sorted(p.parent for p in runs.rglob("manifest.json"))
    assert [p.name.rsplit("__", 1)[0] for p in run_dirs] == ["conversations__tiny__im__smoke__seed42",
                                                             "conversations__tiny__it__smoke__seed42"], run_dirs
    # Through SLURM: submitit's sbatch script, one job array of two, each task's result pickled.
    scripts = list(runs.rglob(".submitit/*/*_submission.sh"))
    assert len(scripts) == 1 and f"#SBATCH --partition={slurm_partition}" in scripts[0].read_text()
    assert "#SBATCH --array=0-1%2" in scripts[0].read_text()
    assert len(list(runs.rglob(".submitit/*/*_result.pkl"))) == 2
    markers = {}
    for run_dir in run_dirs:
        manifest = latest(json.loads((run_dir / "manifest.json").read_text()))
        assert manifest["status"] == "done", manifest
        assert {s: manifest["stages"][s]["status"] for s in ("prepare", "train")} == {"prepare": "done", "train": "done"}
        assert manifest["config"]["method"]["name"] == run_dir.name.split("__")[2]
        assert (run_dir / "prepare" / "_COMPLETE").exists()
        assert (run_dir / "train" / "_COMPLETE").exists() and (run_dir / "train" / "final").is_dir()
        markers[run_dir] = (run_dir / "train" / "_COMPLETE").read_text()

    # The same command again: both stages are complete under the same keys, so every job reuses them.
    proc, second = sweep(slurm_partition, data, runs, env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + job_logs(runs)
    assert len(list(runs.rglob(".submitit/*/*_submission.sh"))) == 2
    for run_dir in run_dirs:
        invocations = json.loads((run_dir / "manifest.json").read_text())["invocations"]
        assert len(invocations) == 2 and invocations[-1]["status"] == "done", invocations
        assert {s: invocations[-1]["stages"][s]["status"] for s in ("prepare", "train")} == {"prepare": "reused",
                                                                                            "train": "reused"}
        log = "".join(p.read_text() for p in run_dir.glob("*.log"))  # Hydra's job log
        assert "prepare: finished under these settings" in log and "train: finished under these settings" in log, log[-3000:]
        assert seconds(invocations[-1]) <= 30
        assert (run_dir / "train" / "_COMPLETE").read_text() == markers[run_dir]  # not redone
    print(f"SLURM sweep: first {first:.0f} s, re-submitted {second:.0f} s")
