"""scripts/gpu_check.py at toy size on CPU (--cpu --tiny), so the prepared GPU check cannot rot between GPU runs.

The default suite runs the numerics and train sections (the model, the layouts, the timing and MFU bookkeeping); the
slow one runs every section, adding four `python -m im_repro` DeepSpeed runs and lm-eval's task indexing (minutes on
2 cores). Each run is a subprocess, as a user would start it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS, REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"


def gpu_check(tmp_path: Path, *sections: str) -> dict:
    if not (ARTIFACTS / "tokenizers" / "llama2").exists():
        pytest.fail(f"{ARTIFACTS}/tokenizers/llama2 is missing: run `make setup`")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--sections", ",".join(sections),
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result = json.loads(out.read_text())
    assert list(result["sections"]) == list(sections)
    assert result["device"]["name"] == "cpu" and result["device"]["peak_bf16_tflops"] is None
    assert "packed / padded effective tokens/s" in proc.stdout  # the printed table
    return result


def check_numerics(n: dict) -> None:
    assert n["dtype"] == "float32" and n["attention"] == {"packed": "sdpa", "padded": "sdpa"}
    assert n["attention_fallback"] is None
    for mode in ("it", "im"):
        # packing must not let examples see each other: in float32 it matches the padded reference to rounding
        assert n[mode]["loss_rel_diff"] <= 1e-5 and n[mode]["grad_rel_diff"] <= 1e-4, n
        assert math.isfinite(n[mode]["padded_loss"]) and n[mode]["padded_loss"] > 0


def check_train(t: dict) -> None:
    assert t["model"] == "tiny" and t["gradient_checkpointing"] and t["parameters"] > 0
    configs = t["configs"]
    assert set(configs) == {"mb1", "padded", "grouped", "packed", "dense"}
    tokens = {name: c["effective_tokens"] for name, c in configs.items()}
    assert len({tokens[c] for c in ("mb1", "padded", "grouped", "packed")}) == 1, tokens  # the same examples
    assert 0 < tokens["dense"] <= tokens["padded"], tokens  # the floor's rectangle drops the remainder of a row
    # the sampled examples differ in length, so right-padding computes more positions than there are tokens
    assert configs["padded"]["computed_positions"] > configs["padded"]["effective_tokens"]
    assert configs["mb1"]["computed_positions"] == configs["mb1"]["effective_tokens"]
    for c in configs.values():
        assert c["it_tokens_per_s"] > 0 and c["im_tokens_per_s"] > 0 and c["im_it_step_time"] > 0
        assert c["mfu"] is None and c["peak_memory_gib"] is None  # no GPU: no peak to divide by, no CUDA allocator
    assert t["packed_over_padded"] > 0 and t["im_it_step_time"] > 0


def test_training_sections_at_toy_size(tmp_path):
    result = gpu_check(tmp_path, "numerics", "train")
    check_numerics(result["sections"]["numerics"])
    check_train(result["sections"]["train"])
    assert set(result["summary"]) >= {"packed / padded effective tokens/s", "IM / IT step time (median)",
                                      "packed vs padded loss, rel diff"}


@pytest.mark.slow
def test_every_section_at_toy_size(tmp_path):
    result = gpu_check(tmp_path, "numerics", "train", "deepspeed", "eval")
    s = result["sections"]
    check_numerics(s["numerics"])
    check_train(s["train"])
    for stage in ("zero2", "zero3"):
        ds = s["deepspeed"][stage]
        assert ds["deepspeed_checkpoint"] and ds["resumed"], ds
        assert ds["first"]["global_step"] == 3 and ds["first"]["resumed_from"] is None
        assert ds["resume"]["resumed_from"].endswith("checkpoint-2") and ds["resume"]["global_step"] == 3
        assert ds["step_3_loss_rel_diff"] <= 1e-4, ds  # step 3 again from the saved weights and optimizer state
        assert math.isfinite(ds["first"]["last_loss"]) and math.isfinite(ds["resume"]["last_loss"])
    lm = s["eval"]["lm_eval"]
    assert lm["loglikelihood_requests"] == 4 * lm["rows"] and lm["requests_per_s"] > 0  # ARC: one per choice
    assert 0 <= lm["acc_norm"] <= 100
    gen = s["eval"]["generation"]
    assert gen["batch_1"]["tokens"] > 0 and gen["batch_4"]["tokens"] > 0 and gen["batched_over_batch_1"] > 0
    assert result["summary"]["DeepSpeed zero3 saved and resumed"] == 1.0
