"""The one generation interface (im_repro/evaluate/generate.py) without vLLM: prompt ids made once with one BOS, a
sampled request's outputs independent of its batch, and the engine in every generating unit's key. The engines'
agreement is tests/test_vllm.py's (make test-vllm)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from im_repro import stages
from im_repro.common import UserError
from im_repro.evaluate import generate
from im_repro.evaluate.generate import HFEngine, Sampling, chat_prompt, encode_prompt
from tests.conftest import ARTIFACTS, compose_with

MESSAGES = [{"role": "user", "content": "Name a colour."}]


def test_prompt_ids_hold_one_bos(llama2):
    ids = encode_prompt(llama2, chat_prompt(MESSAGES, llama2, "tulu"))  # the tokenizer adds BOS, as in training
    assert ids[0] == llama2.bos_token_id and ids.count(llama2.bos_token_id) == 1
    llama3 = AutoTokenizer.from_pretrained(ARTIFACTS / "tokenizers" / "llama3_1")
    text, special = chat_prompt(MESSAGES, llama3, "chat_template")  # the template writes its own BOS
    assert encode_prompt(llama3, (text, special)).count(llama3.bos_token_id) == 1
    with pytest.raises(ValueError, match="two BOS"):  # what a second tokenization of the template's text would do
        encode_prompt(llama3, (text, True))


def test_a_sampled_request_does_not_depend_on_its_batch(llama2):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=32000)
    engine = HFEngine(AutoModelForCausalLM.from_config(config).eval(), llama2, batch_size=4)
    prompts = [encode_prompt(llama2, chat_prompt([{"role": "user", "content": c}], llama2, "tulu"))
               for c in ("A short one.", "A somewhat longer question about colours and shapes?")]
    s = Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9, n=3, seed=5, eos=(llama2.eos_token_id,))
    both = engine.complete(prompts, s)
    assert engine.complete(prompts[1:], s) == both[1:] and engine.complete(prompts[::-1], s) == both[::-1]
    assert all(len(row) == 3 for row in both) and len({tuple(c) for c in both[0]}) > 1
    assert engine.complete(prompts, Sampling(**{**s.__dict__, "seed": 6})) != both


def keys_of(*overrides: str) -> dict[str, str]:
    cfg = compose_with("model=tiny", "method=base", "eval=tiny", "eval.humaneval.enabled=true",
                       "stages=[eval,memorization]", *overrides)
    units = stages.plan(cfg, Path("run"), ["eval", "memorization"]).units
    return {u.path.name: u.key for u in units["eval"] + units["memorization"]}


def test_the_engine_is_in_every_generating_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(generate, "vllm_version", lambda python: "vllm 0.0.test")
    hf, vllm = keys_of("eval.generation.backend=hf"), keys_of("eval.generation.backend=vllm")
    assert keys_of() == hf  # auto without a GPU: HF
    assert hf["arc_easy"] == vllm["arc_easy"]  # lm-eval's engine is eval.harness.backend
    assert all(hf[name] != vllm[name] for name in ("humaneval", "alpaca_eval", "memorization"))
    assert keys_of("eval.generation.backend=vllm", "+eval.generation.vllm_args.enforce_eager=true") == vllm
    assert keys_of("eval.generation.backend=vllm", "+eval.generation.vllm_args.quantization=fp8") != vllm
    assert keys_of("eval.generation.batch_size=3", "eval.generation.vllm_python=/elsewhere/python") == hf
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert keys_of() == vllm  # auto with a GPU and vLLM installed
    monkeypatch.setattr(generate, "vllm_version", lambda python: None)
    assert keys_of() == hf
    with pytest.raises(UserError, match="eval.generation.vllm_python"):
        keys_of("eval.generation.backend=vllm")


def test_continuous_batching_gives_the_static_batches_tokens(llama2):
    """eval.generation.hf_batching=continuous (transformers' generate_batch) answers greedy requests as `generate`
    does one prompt at a time; a wide init makes the random model's choices clear, not near-ties."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, vocab_size=32000,
                                  initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = [encode_prompt(llama2, chat_prompt([{"role": "user", "content": "word " * k}], llama2, "tulu"))
               for k in (1, 9, 4, 20)]
    s = Sampling(max_new_tokens=8, eos=(llama2.eos_token_id,))
    static = HFEngine(model, llama2, batch_size=1).complete(prompts, s)
    assert HFEngine(model, llama2, batch_size=2, continuous=True).complete(prompts, s) == static
    assert sum(len(row[0]) for row in static) > 4  # tokens, not empty answers
