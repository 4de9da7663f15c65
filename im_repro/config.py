"""Typed schemas for every config group, registered in Hydra's ConfigStore.

The YAML files under conf/ hold the values; these dataclasses hold the types, so a misspelt key or a wrong type
fails at start-up with the key's full path. Defaults here are the documented ones; `im-repro --cfg job` prints
the resolved values and every run's manifest.json records them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, ListConfig

from im_repro.common import UserError, world_size


class OnInvalid(str, Enum):
    error = "error"
    skip = "skip"


class Structure(str, Enum):
    strict = "strict"
    lenient = "lenient"


class MaskMode(str, Enum):
    """Which tokens carry the loss (im_repro/masking.py)."""

    it = "it"
    im = "im"
    im_released = "im_released"
    full = "full"
    weighted = "weighted"


class Reduction(str, Enum):
    """What a global batch's loss divides the weighted sum of its token losses by (im_repro/train.py)."""

    per_example = "per_example"  # each example's sum by its weights' sum, then the mean over examples (the paper)
    per_token = "per_token"  # the sum over the global batch by the weights' sum over it
    per_example_nonzero = "per_example_nonzero"  # each example's sum by its count of non-zero weights, then the mean
    per_token_nonzero = "per_token_nonzero"  # by the count of non-zero weights in the global batch (WIT)


class Weighting(str, Enum):
    """A token's weight beyond its segment's (im_repro/train.py, LossSpec)."""

    segment = "segment"  # the segment's weight alone (it, im, weighted)
    dft = "dft"  # times the token's own probability, stop-gradient (DFT, arXiv 2508.05629)


class Template(str, Enum):
    tulu = "tulu"
    chat_template = "chat_template"


def plain(value):
    """The string behind an enum-typed field: the typed config holds Enum members, a plain dict strings."""
    return getattr(value, "value", value)


@dataclass
class SourceConfig:
    """Where a dataset comes from when `data.path` is not given."""

    kind: str = MISSING  # hf (datasets Hub id) | url (a .json/.jsonl file) | rebuild (a recipe in data.py)
    uri: str = MISSING  # Hub id, URL, or the recipe's name
    split: str = "train"
    subset: Optional[str] = None  # HF config name, or the file inside a Hub repo (`data_files`)
    # Keep only rows whose `dataset` field matches this regex (the Tulu V2 subsets of ShareGPT, WizardLM, ...).
    dataset_regex: Optional[str] = None
    # Extra arguments of the rebuild recipe (upstream files, seeds), see data.REBUILDERS.
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SubsetConfig:
    """Figure 2's controlled subsets (im_repro/subsets.py), drawn from the whole dataset after loading."""

    kind: Optional[str] = None  # None: every example | ratio: `n` at about `target_ratio` | size: one of a nested series
    target_ratio: float = 10.0  # instruction / output length
    n: int = 3000
    size: Optional[int] = None  # kind=size: which member of `sizes`
    sizes: list[int] = field(default_factory=lambda: [1000, 2000, 5000, 10000, 20000, 35000])
    tolerance: float = 0.1  # every chosen example's ratio within this fraction of the target
    seed: int = 42  # apart from the training seed: every training seed sees the same subset


@dataclass
class DataConfig:
    name: str = MISSING
    paper_name: str = MISSING  # as in the paper's tables
    paper_size: Optional[int] = None  # examples, PAPER.md Table 5
    source: SourceConfig = field(default_factory=SourceConfig)
    converter: str = "messages"  # row -> messages, see data.CONVERTERS
    path: Optional[str] = None  # a local .json/.jsonl file; overrides `source`
    limit: Optional[int] = None  # keep the first N valid examples
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    on_invalid: OnInvalid = OnInvalid.error
    # strict: an assistant-first conversation or roles not alternating is an invalid row (error, or skipped and
    # counted); lenient: accepted and counted. A conversation without an assistant turn is invalid either way.
    structure: Structure = Structure.strict
    # An example whose truncation at train.max_seq_length leaves no output token is dropped and counted (under IM it
    # would train on its instruction alone); true keeps it where its mode still supervises a token (the paper's code).
    keep_output_less: bool = False
    licence: str = "see the source"


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # Hub id or local folder (weights, or only the config for init=random)
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None  # Hub id or folder of the tokenizer; defaults to `path`
    tokenizer_gguf_file: Optional[str] = None
    # A chat template to use instead of the tokenizer's own (prepare.template=chat_template, and generation from the
    # untuned model): a tokenizer folder, Hub id or .jinja file. Trained checkpoints save the template they used.
    chat_template: Optional[str] = None
    use_fast_tokenizer: bool = True  # false = the slow (Python / SentencePiece) tokenizer, as the paper used
    init: str = "pretrained"  # pretrained | random (build from `arch` for tests and the CPU demo)
    arch: dict[str, Any] = field(default_factory=dict)  # config overrides for init=random
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    params_b: float = 0.0  # parameter count in billions, for plans and throughput


@dataclass
class MethodConfig:
    """A row label of the paper's tables and the loss it trains with: which tokens, their weights and what the sum of
    their losses is divided by; NEFTune or KL in `train` (a conf/method/ file may set those too)."""

    name: str = MISSING  # the label in tables and run directories: it, im, neftune, im_neftune, kl, weighted0.5...
    mask: Optional[MaskMode] = MISSING  # which tokens carry the loss; null: nothing is trained (method=base)
    prompt_loss_weight: Optional[float] = None  # mask=weighted: the instruction tokens' weight (0 = it, 1 = im)
    response_weight: Optional[float] = None  # mask=weighted: the output tokens' weight (None: 1)
    weighting: Weighting = Weighting.segment
    reduction: Reduction = Reduction.per_example


@dataclass
class PrepareConfig:
    template: Template = Template.tulu
    num_proc: int = 1
    batch_size: int = 256  # conversations tokenized per call in the batched path
    cache_dir: str = "${oc.env:IM_REPRO_CACHE,${oc.env:HOME}/.cache/im-repro}"


@dataclass
class KLConfig:
    mode: str = "none"  # none | kl (Eq. 5, over the vocabulary) | kl_released (the released code's term)
    weight: float = 0.0  # lambda


@dataclass
class TrainConfig:
    """The recipe (PAPER.md §3). Consumed by the train stage; `max_seq_length` also bounds `prepare`."""

    name: str = MISSING
    max_seq_length: int = 2048
    global_batch_size: int = 128
    per_device_batch_size: int = 1
    learning_rate: float = 2e-5
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 2.0
    max_steps: int = -1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # accelerate fills the released DeepSpeed config's "auto" with 1.0
    bf16: bool = True
    gradient_checkpointing: bool = True
    packing: bool = False  # padding-free packing of each micro-batch
    packing_row_tokens: Optional[int] = None  # cap on a packed row's tokens; None = max_seq_length
    group_by_length: bool = False
    neftune_alpha: Optional[float] = None  # the paper used 5
    kl: KLConfig = field(default_factory=KLConfig)
    # How each token's cross-entropy is computed: plain (from the logits), cce (cut-cross-entropy) or liger (Liger's
    # fused linear cross-entropy, GPU), the fused two from the hidden states without the batch's logits; auto picks
    # one (train.loss_kernel). The same loss either way (tests/test_loss.py), so it is in no key.
    loss_kernel: str = "auto"
    deepspeed: Optional[str] = None  # a DeepSpeed JSON config, e.g. conf/deepspeed/zero3.json
    logging_steps: int = 1
    save_strategy: str = "epoch"  # epoch | steps | no
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    report_to: list[str] = field(default_factory=list)  # wandb, tensorboard
    dataloader_num_workers: int = 0


@dataclass
class HarnessTask:
    """One lm-evaluation-harness task (or group) of a suite, scored by one metric into one Table 1 category."""

    task: str = MISSING  # lm-eval task or group name
    metric: str = MISSING  # key in lm-eval's results, "metric,filter" (e.g. "acc_norm,none")
    # More metrics of the same lm-eval run ("metric,filter"), each reported as "<benchmark>/<metric>" (IFEval's
    # instruction-level and loose accuracies beside its prompt-level strict one)
    extra_metrics: list[str] = field(default_factory=list)
    category: str = MISSING  # knowledge | multilinguality | commonsense | math_coding | bbh | safety
    num_fewshot: Optional[int] = None  # None: the task's own default
    higher_is_better: bool = True
    scale: float = 1.0  # the released code divides TER by 100
    limit: Optional[int] = None  # the first N examples of each task; overrides harness.limit
    # Run the official task on local files of the same schema: {split: path}; `dataset_path` is arrow or json. Paths
    # that are all null (`${offline:...}` where there is no offline copy) mean the official dataset.
    data_files: Optional[dict[str, Optional[str]]] = None
    dataset_path: str = "arrow"
    # lm-eval's generation arguments over the task's own, e.g. "max_gen_toks=96" (a generate_until task only)
    gen_kwargs: Optional[str] = None


@dataclass
class HarnessSeeds:
    """The seeds handed to lm-eval's `simple_evaluate`; None: lm-eval's own default (its signature's), which the
    paper's runs used. The run's `seed` never reaches them: it would change which few-shot examples are drawn."""

    random_seed: Optional[int] = None
    numpy_random_seed: Optional[int] = None
    torch_random_seed: Optional[int] = None
    fewshot_random_seed: Optional[int] = None


@dataclass
class HarnessConfig:
    backend: str = "hf"  # hf | vllm
    max_length: Optional[int] = None  # context length; None: the model's own (the README's ${MAX_LENGTH} flag)
    batch_size: str = "auto"
    max_batch_size: int = 64
    limit: Optional[int] = None  # the first N examples of each task (an integer: lm-eval reads < 1.0 as a fraction)
    seeds: HarnessSeeds = field(default_factory=HarnessSeeds)
    # How a benchmark named by an lm-eval tag (ai2_arc, hendrycks_ethics, gpt3_translation_benchmarks, ...) is scored:
    # lm-eval >= 0.4.3 no longer aggregates tags; its groups of the paper's era weighted each task by its size.
    # true: that size-weighted mean (lm-eval's aggregate_subtask_metrics); false: the plain mean of the tasks.
    tag_weight_by_size: bool = True
    apply_chat_template: bool = False  # the paper's prompts were most likely raw (PAPER.md §1.2)
    log_samples: bool = True
    tasks: dict[str, HarnessTask] = field(default_factory=dict)


@dataclass
class JudgeConfig:
    """Who grades open-ended answers: the OpenAI API, any OpenAI-compatible endpoint, or a local HF model."""

    kind: str = "openai"  # openai | openai_compatible | local
    model: str = "gpt-4"  # API model name, or a Hub id / folder for kind=local
    base_url: Optional[str] = None  # the server of kind=openai_compatible; for kind=openai, a proxy (None: OpenAI's)
    api_key_env: str = "OPENAI_API_KEY"
    max_new_tokens: int = 1024
    # The OpenAI client's own retries (connection errors, 408/409/429/5xx, with its exponential back-off) and
    # per-request timeout; an error left after them is recorded in metrics.json's `missing`, never as a judgment.
    max_retries: int = 6
    timeout_s: float = 600.0
    gguf_file: Optional[str] = None


@dataclass
class HumanEvalConfig:
    enabled: bool = False
    execute: bool = False  # run model-written code (sandboxed); off unless the user opts in
    allow_unisolated: bool = False  # also run it where no network namespace can be made (socket guard only)
    n: int = 20
    temperatures: list[float] = field(default_factory=lambda: [0.1, 0.7])
    top_p: float = 0.95
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=lambda: ["\nclass", "\ndef", "\n#", "\nif", "\nprint"])
    ks: list[int] = field(default_factory=lambda: [1, 10])
    limit: Optional[int] = None  # the first N problems
    timeout_s: float = 10.0  # wall clock per program
    memory_mb: int = 1024
    workers: int = 4
    category: str = "math_coding"


@dataclass
class AlpacaEvalConfig:
    enabled: bool = False
    versions: list[str] = field(default_factory=lambda: ["1.0", "2.0"])
    prompts: Optional[str] = None  # a local JSON/JSONL of {instruction, dataset[, output]}; None: the Hub set
    reference_outputs: dict[str, Optional[str]] = field(default_factory=dict)  # per version; None: the package's
    annotators: dict[str, str] = field(
        default_factory=lambda: {"1.0": "alpaca_eval_gpt4", "2.0": "weighted_alpaca_eval_gpt4_turbo"}
    )
    limit: Optional[int] = None
    max_new_tokens: int = 8192
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    category: str = "llm_judged"  # for eval.only; its Table 1 columns are its own (AE 1.0, AE 2.0)


@dataclass
class MTBenchConfig:
    enabled: bool = False
    questions: str = MISSING  # URL or local path of FastChat's question.jsonl
    references: str = MISSING  # URL or local path of the GPT-4 reference answers
    judge_prompts: str = MISSING  # URL or local path of FastChat's judge_prompts.jsonl
    limit: Optional[int] = None
    max_new_tokens: int = 1024
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    category: str = "llm_judged"  # for eval.only; its Table 1 column is its own (MT-Bench)


@dataclass
class ArenaHardConfig:
    enabled: bool = False
    # A folder holding question.jsonl and model_answer/<baseline>.jsonl (fetch_artifacts' offline copy); None: the
    # official files at the pinned commit (im_repro/evaluate/arena_hard.py), each checked by its sha256 either way
    data_dir: Optional[str] = None
    categories: list[str] = field(default_factory=lambda: ["hard_prompt", "creative_writing"])
    limit: Optional[int] = None  # the first N questions of each category
    max_new_tokens: int = 4096
    # Style control beside each category's score (show_result.py --control-features): length, markdown; [] for none
    control_features: list[str] = field(default_factory=lambda: ["length", "markdown"])
    # The official v2.0 judge (config/arena-hard-v2.0.yaml: gpt-4.1, temperature 0, 16,000 tokens)
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(model="gpt-4.1", max_new_tokens=16000))
    category: str = "llm_judged"


@dataclass
class GenerationConfig:
    """How the generating benchmarks (HumanEval, AlpacaEval, MT-Bench, Arena-Hard) and the memorization stage generate
    (im_repro/evaluate/generate.py). Prompts reach either engine as the token ids our renderer made, once."""

    # hf: transformers' generate in length-sorted static batches, in this process; vllm: vLLM in a worker process
    # of `vllm_python`; auto: vllm where a GPU is there and vLLM is installed in `vllm_python`, else hf. The engine
    # that ran (and its version) is part of every generating benchmark's key.
    backend: str = "auto"
    # The python of an environment with vLLM (its pins often clash with training's: e.g. .venv-vllm/bin/python);
    # None: this process's own python.
    vllm_python: Optional[str] = None
    batch_size: int = 8  # hf: prompts per batch (sampled requests go one prompt, n rows, at a time)
    # hf: static (length-sorted static batches, left-padded) | continuous (transformers' continuous batching, for
    # greedy requests without stop sequences: same tokens, but 0.72x static on CPU at 16 prompts: README, Benchmark)
    hf_batching: str = "static"
    gpu_memory_utilization: float = 0.85  # vllm: the share of GPU memory its weights and KV cache may take
    max_model_len: Optional[int] = None  # vllm: context length; None: the model's own
    vllm_args: dict[str, Any] = field(default_factory=dict)  # more arguments of vllm.LLM (enforce_eager: true, ...)


@dataclass
class EvalConfig:
    name: str = MISSING
    checkpoint: Optional[str] = None  # None: this run's train/final if complete, else model.path
    # The dtype the checkpoint is evaluated in; auto: the checkpoint's own (lm-eval's default; fp16 for the Llama-2
    # Hub checkpoints), independent of model.dtype, which is the dtype training loads the model in.
    dtype: str = "auto"
    only: Optional[list[str]] = None  # benchmark names or categories to run; None: the whole suite
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    humaneval: HumanEvalConfig = field(default_factory=HumanEvalConfig)
    alpaca_eval: AlpacaEvalConfig = field(default_factory=AlpacaEvalConfig)
    mt_bench: MTBenchConfig = field(default_factory=MTBenchConfig)
    arena_hard: ArenaHardConfig = field(default_factory=ArenaHardConfig)


@dataclass
class AnalysisConfig:
    """The overfitting analyses of PAPER.md §4.3: per-example output loss, and BLEU memorisation of training outputs."""

    heldout: DataConfig = field(default_factory=DataConfig)  # the test set (Tulu V2) for the heldout_loss stage
    heldout_fraction: float = 0.1  # the paper's 10% sample
    # random: a seeded uniform sample (what the paper says); first_per_source: the released code's first examples of
    # each `dataset` source in file order (PAPER.md §5.3, its tulu_dataset_01 of 32,618 examples)
    heldout_sampling: str = "random"
    loss_limit: Optional[int] = None  # examples per split (None: all)
    memorization_limit: Optional[int] = None  # training instructions answered for BLEU (None: all)
    # The released code allowed 8,192 new tokens (vLLM); no training example was longer than train.max_seq_length
    # (2,048), so no memorised output can be either, and greedy decoding of a tuned model ends at EOS well before.
    max_new_tokens: int = 2048
    batch_size: int = 8  # heldout_loss's examples per forward pass (memorization generates as eval.generation says)


@dataclass
class StatsConfig:
    """The bootstrap behind every standard error and paired interval the report prints (im_repro.stats)."""

    resamples: int = 10000
    confidence: float = 0.95
    seed: int = 0  # the bootstrap's own seed, apart from training: the same runs always get the same intervals
    method: str = "BCa"  # scipy.stats.bootstrap's interval: BCa | percentile | basic


@dataclass
class ReportConfig:
    """What the report stage builds from the finished runs of `experiment`, and where."""

    tables: list[str] = field(default_factory=list)  # table1 | table2 | table3 | table4 | table5 | losses
    figures: list[str] = field(default_factory=list)  # figure2_ratio | figure2_size | loss_histograms | curves
    baseline: str = "it"  # the loss deltas are taken against
    label: str = ""  # printed above every table, e.g. "CPU demo: not a reproduction"
    output_dir: str = "results/${experiment}"
    # The runs the tables need: the experiment's sweep (hydra.sweeper.params) as `key: a,b,c` (each run composed
    # and found in runs_dir by its key). Empty: the sweep of the experiment config the report runs under.
    runs: dict[str, str] = field(default_factory=dict)


@dataclass
class StageResources:
    gpus: int = 0  # per node
    nodes: int = 1
    cpus: int = 4
    mem_gb: int = 16
    hours: float = 1.0  # wall-clock limit asked for


def _resources() -> dict[str, StageResources]:
    """Train on the GPUs it needs (the paper: 2 or 4 A100 80G), eval on fewer, report on a CPU."""
    return {
        "prepare": StageResources(gpus=0, cpus=8, mem_gb=64, hours=2),
        "train": StageResources(gpus=4, cpus=32, mem_gb=256, hours=24),
        "eval": StageResources(gpus=1, cpus=16, mem_gb=128, hours=12),
        "heldout_loss": StageResources(gpus=1, cpus=8, mem_gb=64, hours=2),
        "memorization": StageResources(gpus=1, cpus=8, mem_gb=64, hours=4),
        "report": StageResources(gpus=0, cpus=2, mem_gb=8, hours=1),
    }


@dataclass
class EvalSize:
    """What one benchmark makes an engine compute per run, for the dry run's eval estimate (launch.eval_sizes: per
    lm-eval task, and per open-ended benchmark and memorization). Documents are the scored split's; tokens are
    Llama-2 tokens, estimated (assumptions, not counts of the data, most of which is not offline here)."""

    documents: int = MISSING  # the scored split's examples (a suite's limit can lower it)
    requests: float = 1.0  # per document: a multiple-choice task's choices, each scored; an open-ended one's turns
    example_tokens: int = 100  # one example's tokens: a few-shot prompt holds (few-shot count + 1) of them
    fewshot: int = 0  # the task's own few-shot count, used when the suite's num_fewshot is null
    generated_tokens: int = 0  # per request, for a task that generates: a typical answer, below the limit


def _eval_sizes() -> dict[str, EvalSize]:
    """eval=paper's and eval=modern's benchmarks: test (else validation) documents as lm-eval scores them; token
    counts estimated."""
    mc = EvalSize  # scored by log-likelihood, one request per choice
    return {
        "mmlu": mc(14042, 1, 110),  # one-token choices: lm-eval scores them in one pass per question
        "piqa": mc(1838, 2, 50), "openbookqa": mc(500, 4, 30), "hellaswag": mc(10042, 4, 110),
        "lambada": mc(10306, 1, 90), "lambada_multilingual": mc(25765, 1, 110), "wsc273": mc(273, 2, 40),
        "winogrande": mc(1267, 2, 40), "ai2_arc": mc(3548, 4, 50), "arc_easy": mc(2376, 4, 50),
        "arc_challenge": mc(1172, 4, 55), "truthfulqa_mc2": mc(817, 7, 200), "toxigen": mc(940, 2, 40),
        "hendrycks_ethics": mc(19968, 2, 60),
        "gpt3_translation_benchmarks": EvalSize(16002, 1, 45, generated_tokens=45),
        "wmt14": EvalSize(6006, 1, 45, generated_tokens=45), "wmt16": EvalSize(9996, 1, 45, generated_tokens=45),
        "coqa": EvalSize(500, 1, 400, generated_tokens=12), "gsm8k_cot": EvalSize(1319, 1, 110, 8, 130),
        "bbh_cot_fewshot": EvalSize(6511, 1, 250, 3, 120), "bbh_zeroshot": EvalSize(6511, 1, 150, 0, 60),
        "humaneval": EvalSize(164, 1, 150, generated_tokens=110),  # requests: n x temperatures, from eval.humaneval
        "alpaca_eval": EvalSize(805, 1, 60, generated_tokens=400),
        "mt_bench": EvalSize(80, 2, 350, generated_tokens=350),  # turn 2's prompt holds turn 1 and its answer
        "memorization": EvalSize(1000, 1, 100, generated_tokens=300),  # documents: the training examples
        # eval=modern's others (its gsm8k, bbh and truthfulqa entries are the tasks above)
        "ifeval": EvalSize(541, 1, 60, generated_tokens=350), "mmlu_pro": EvalSize(12032, 1, 250, 5, 250),
        "arena_hard": EvalSize(750, 1, 200, generated_tokens=1000),  # v2.0: 500 hard prompts + 250 creative writing
    }


@dataclass
class EngineThroughput:
    """An engine's eval throughput (tokens/s) for a 7B model in bf16 on one A100 80GB; a model of params_b billion
    parameters runs at 7 / params_b of it. ASSUMED, not measured (no GPU has run this project's eval yet):
    scoring as 6.7B x 2 FLOPs per token at ~35% of the A100's 312 TFLOP/s; HF generation as static batches of 16 at
    ~30 ms a step less the padding and stragglers of length-sorted batches; vLLM ~6x that, well below the 14-24x
    over HF that vLLM's authors report for sampled LLaMA-7B workloads. scripts/gpu_check.py's eval section measures
    both engines on one GPU: replace these with its numbers."""

    scored_tokens_per_s: float = MISSING  # prompt tokens through a forward pass (log-likelihoods, prefill)
    generated_tokens_per_s: float = MISSING  # new tokens, batched as the engine batches them


def _throughput() -> dict[str, EngineThroughput]:
    return {"hf": EngineThroughput(8000.0, 400.0), "vllm": EngineThroughput(8000.0, 2500.0)}


@dataclass
class LaunchConfig:
    """Resources each stage asks for (a SLURM phase job asks for its phase's: launch.phase=train or eval, each stage's
    phase declared in im_repro/stages.py), and the assumptions of the dry-run GPU-hours estimate."""

    resources: dict[str, StageResources] = field(default_factory=_resources)
    phase: Optional[str] = None  # train | eval: run only the stages of that phase; None: every stage
    # 6 * parameters * tokens FLOPs per epoch, at this fraction of the GPU's dense bf16 peak
    gpu_peak_tflops: float = 312.0  # A100; an H100 SXM is 989
    utilisation: float = 0.4
    # tokens per example when the dataset is not prepared yet (LIMA averages ~850 tokens with Llama-2's tokenizer)
    tokens_per_example: int = 800
    # The eval and memorization estimates: what each benchmark computes (sizes) at each engine's throughput
    eval_sizes: dict[str, EvalSize] = field(default_factory=_eval_sizes)
    eval_throughput: dict[str, EngineThroughput] = field(default_factory=_throughput)
    # accelerate launch under SLURM: one task per node re-executes the command on all of the node's GPUs, e.g.
    # conf/accelerate/multi_node_zero3.yaml
    accelerate_config: Optional[str] = None
    main_process_port: int = 29500


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = MISSING
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)  # the report's uncertainty (conf/stats/)
    stages: list[str] = field(default_factory=lambda: ["prepare"])
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    dry_run: bool = False  # print the job plan (runs, stages, resources, GPU-hours) and submit nothing
    seed: int = 42
    force: bool = False  # recompute this command's stages from scratch, even those finished under other settings
    experiment: str = "default"
    runs_dir: str = "runs"
    datasets: dict[str, str] = field(default_factory=dict)  # named dataset lists the experiments sweep (config.yaml)


# Keys that were renamed: a command (or config) using the old name fails at start-up naming the new one.
RENAMED = {
    "method.loss": "method.mask",
    "train.loss_normalization": "method.reduction (per_example | per_token | per_example_nonzero | per_token_nonzero)",
    "method.normalize": "method.reduction (weight_sum: per_example or per_token; nonzero_tokens: per_example_nonzero "
                        "or per_token_nonzero)",
    "skip_stages": "method=base (method.mask=null: nothing is trained, prepare and train are left out)",
    "eval.generation_batch_size": "eval.generation.batch_size",
}


def renamed(overrides: list[str]) -> str | None:
    """Why a command's overrides cannot run as written (a renamed key or stage), or None."""
    for arg in overrides:
        key, _, value = arg.lstrip("+~").partition("=")
        if key in RENAMED:
            return f"{arg}: {key} was renamed; use {RENAMED[key]}"
        if key == "stages" and "loss" in value.strip("[]").replace(" ", "").split(","):
            return f"{arg}: the stage loss was renamed heldout_loss"
    return None


# ------------------------------------------------------------------------------------------ start-up checks -----


@dataclass(frozen=True)
class Range:
    low: float | None = None  # the smallest valid value (exclusive when `open_low`)
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    none: bool = False  # null is valid (the setting is off, or "all")

    def holds(self, value) -> bool:
        if value is None:
            return self.none
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        return low_ok and (self.high is None or (value < self.high if self.open_high else value <= self.high))

    def __str__(self) -> str:
        low = "" if self.low is None else f"{'>' if self.open_low else '>='} {self.low:g}"
        high = "" if self.high is None else f"{'<' if self.open_high else '<='} {self.high:g}"
        return " and ".join(filter(None, [low, high])) + (" (or null)" if self.none else "")


COUNT, SOME, POSITIVE, FRACTION = Range(1), Range(1, none=True), Range(0, open_low=True), Range(0, 1, open_low=True)
# Every numeric setting with a valid range, checked at start-up (`validate`); `*` stands for every key of a mapping
# and a list's every element is checked.
RANGES: dict[str, Range] = {
    "seed": Range(0), "data.limit": SOME, "data.subset.n": COUNT, "data.subset.size": SOME,
    "data.subset.target_ratio": POSITIVE, "data.subset.tolerance": Range(0), "data.subset.sizes": COUNT,
    "prepare.num_proc": COUNT, "prepare.batch_size": COUNT,
    "method.prompt_loss_weight": Range(0, 1, none=True), "method.response_weight": Range(0, open_low=True, none=True),
    "train.max_seq_length": COUNT, "train.global_batch_size": COUNT, "train.per_device_batch_size": COUNT,
    "train.learning_rate": POSITIVE, "train.warmup_ratio": Range(0, 1, open_high=True), "train.weight_decay": Range(0),
    "train.epochs": POSITIVE, "train.adam_beta1": Range(0, 1, open_high=True),
    "train.adam_beta2": Range(0, 1, open_high=True), "train.adam_epsilon": POSITIVE,
    "train.max_grad_norm": Range(0),  # 0: no clipping
    "train.packing_row_tokens": SOME, "train.neftune_alpha": Range(0, open_low=True, none=True),
    "train.kl.weight": Range(0), "train.logging_steps": COUNT, "train.save_steps": COUNT,
    "train.save_total_limit": SOME, "train.dataloader_num_workers": Range(0),
    "eval.generation.batch_size": COUNT, "eval.generation.gpu_memory_utilization": FRACTION,
    "eval.generation.max_model_len": SOME, "eval.harness.max_length": SOME, "eval.harness.max_batch_size": COUNT,
    "eval.harness.limit": SOME, "eval.harness.tasks.*.limit": SOME,
    "eval.harness.tasks.*.num_fewshot": Range(0, none=True), "eval.harness.tasks.*.scale": POSITIVE,
    "eval.humaneval.n": COUNT, "eval.humaneval.temperatures": Range(0), "eval.humaneval.top_p": FRACTION,
    "eval.humaneval.max_new_tokens": COUNT, "eval.humaneval.ks": COUNT, "eval.humaneval.limit": SOME,
    "eval.humaneval.timeout_s": POSITIVE, "eval.humaneval.memory_mb": COUNT, "eval.humaneval.workers": COUNT,
    "eval.alpaca_eval.limit": SOME, "eval.alpaca_eval.max_new_tokens": COUNT, "eval.mt_bench.limit": SOME,
    "eval.mt_bench.max_new_tokens": COUNT,
    "eval.alpaca_eval.judge.max_new_tokens": COUNT, "eval.alpaca_eval.judge.max_retries": Range(0),
    "eval.alpaca_eval.judge.timeout_s": POSITIVE, "eval.mt_bench.judge.max_new_tokens": COUNT,
    "eval.mt_bench.judge.max_retries": Range(0), "eval.mt_bench.judge.timeout_s": POSITIVE,
    "eval.arena_hard.limit": SOME, "eval.arena_hard.max_new_tokens": COUNT, "eval.arena_hard.judge.max_new_tokens": COUNT,
    "eval.arena_hard.judge.max_retries": Range(0), "eval.arena_hard.judge.timeout_s": POSITIVE,
    "analysis.heldout_fraction": FRACTION, "analysis.loss_limit": SOME, "analysis.memorization_limit": SOME,
    "analysis.max_new_tokens": COUNT, "analysis.batch_size": COUNT, "analysis.heldout.limit": SOME,
    "stats.resamples": COUNT, "stats.confidence": Range(0, 1, open_low=True, open_high=True), "stats.seed": Range(0),
    "launch.gpu_peak_tflops": POSITIVE, "launch.utilisation": FRACTION, "launch.tokens_per_example": COUNT,
    "launch.resources.*.gpus": Range(0), "launch.resources.*.nodes": COUNT, "launch.resources.*.cpus": COUNT,
    "launch.resources.*.mem_gb": COUNT, "launch.resources.*.hours": POSITIVE,
    "launch.eval_sizes.*.documents": COUNT, "launch.eval_sizes.*.requests": POSITIVE,
    "launch.eval_sizes.*.example_tokens": COUNT, "launch.eval_sizes.*.fewshot": Range(0),
    "launch.eval_sizes.*.generated_tokens": Range(0), "launch.eval_throughput.*.scored_tokens_per_s": POSITIVE,
    "launch.eval_throughput.*.generated_tokens_per_s": POSITIVE,
}


def _values(node, path: str):
    """(dotted path, value) for `path` in `node`, `*` matching every key of a mapping, a list's every element."""
    head, _, rest = path.partition(".")
    if node is None:
        return
    children = node.items() if head == "*" else [(head, node.get(head))] if head in node else []
    for key, child in children:
        if rest:
            yield from ((f"{key}.{p}", v) for p, v in _values(child, rest))
        elif isinstance(child, (list, tuple, ListConfig)):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(child))
        else:
            yield key, child


def accumulation_steps(global_batch: int, per_device: int, processes: int) -> int:
    """Gradient accumulation steps that make `global_batch` from `processes` micro-batches of `per_device`."""
    if global_batch % (per_device * processes):
        raise UserError(f"train.global_batch_size={global_batch} is not a multiple of train.per_device_batch_size="
                        f"{per_device} x {processes} processes: change one of them")
    return global_batch // (per_device * processes)


def validate(cfg, overrides: list[str] = ()) -> None:
    """Refuse, at start-up and with the fix, settings outside their range (`RANGES`) and combinations that cannot
    run; a later stage would otherwise fail on them after hours of work, or blame the data."""
    bad = [f"{path}={value!r} (must be {RANGES[rule]})" for rule in RANGES
           for path, value in _values(cfg, rule) if not RANGES[rule].holds(value)]
    if bad:
        raise UserError("settings out of range: " + "; ".join(bad))
    m, t = cfg.method, cfg.train
    mask = getattr(m.mask, "value", m.mask)
    reduction = getattr(m.reduction, "value", m.reduction)
    if mask is not None and mask != "weighted" and (m.prompt_loss_weight is not None or m.response_weight is not None
                                                    or reduction.endswith("_nonzero")):
        raise UserError(f"method.prompt_loss_weight, method.response_weight and method.reduction={reduction} act on "
                        f"mask=weighted's weights only (for 0/1 weights the reductions agree), not mask={mask}: "
                        "use method=weighted")
    if mask == "weighted" and m.prompt_loss_weight is None:
        raise UserError("method.mask=weighted needs method.prompt_loss_weight in [0, 1]")
    if t.loss_kernel not in ("auto", "plain", "cce", "liger"):
        raise UserError(f"train.loss_kernel={t.loss_kernel}: choose auto, plain, cce or liger")
    if t.loss_kernel in ("cce", "liger") and t.kl.mode != "none":
        raise UserError(f"train.loss_kernel={t.loss_kernel} never forms the logits, which train.kl.mode={t.kl.mode} "
                        "needs: use train.loss_kernel=plain (or auto)")
    if cfg.data.subset.kind and cfg.data.limit:  # the limit would cut the pool the subset is chosen from
        raise UserError(f"data={cfg.data.name}: data.limit and data.subset cannot be combined")
    accumulation_steps(t.global_batch_size, t.per_device_batch_size, world_size())
    model_paths = [o.partition("=")[2] for o in overrides if o.startswith("model.path=")]
    if model_paths and cfg.model.init == "random":
        raise UserError(f"model={cfg.model.name} builds a random model from model.arch (model.init=random) and reads "
                        f"no weights from model.path={model_paths[0]}: to evaluate that checkpoint as it is, pass "
                        f"eval.checkpoint={model_paths[0]} (or a model config that loads it: model.init=pretrained)")
    checkpoint = cfg.eval.checkpoint
    if checkpoint and {"prepare", "train"} & set(cfg.stages):
        raise UserError(f"eval.checkpoint={checkpoint} scores a model as it is: stages prepare and train do "
                        f"not apply to it (stages={list(cfg.stages)}); pass stages=[eval] (or the analyses)")
    if checkpoint and not Path(checkpoint).is_dir() and (checkpoint.startswith((".", "/", "~"))
                                                         or checkpoint.count("/") > 1):
        raise UserError(f"eval.checkpoint={checkpoint}: no such folder (and not a Hub id, which is name or "
                        "namespace/name); a run's trained model is runs/<run>/train/final")
    for setting, path in (("data.path", cfg.data.path), ("analysis.heldout.path", cfg.analysis.heldout.path)):
        if path and not Path(path).is_file():
            raise UserError(f"{setting}={path}: no such file (a .json or .jsonl file of conversations)")


def register() -> None:
    """The root schema; config.yaml lists it first, so every group merged into it is type-checked."""
    ConfigStore.instance().store(name="schema", node=Config)
