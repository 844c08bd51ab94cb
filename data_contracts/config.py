"""The run configuration: one validated section per stage, loaded from YAML with overrides."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)


# Upper bounds no real run wants to pass (a typo such as batch_size=1000000000 or epochs=1e12
# is an error naming the key, not hours of work): generous enough for an 8B model on long
# contexts on a multi-GPU node.
MAX_BATCH = 4096  # per-device batch, gradient accumulation, rows per teacher/eval/spaCy batch
MAX_TOKENS = 1_048_576  # sequence and generation lengths: 1M-token contexts
MAX_STEPS = 100_000_000  # optimizer steps, and eval/save/logging intervals
MAX_RECORDS = 100_000_000  # record counts one setting selects (seeds, held-out, eval samples)
MAX_CHARS = 100_000_000  # characters of one record
MAX_WORDS = 1_000_000
MAX_WORKERS = 1024
MAX_TIMEOUT_S = 30 * 24 * 3600


class FinalError(Exception):
    """A failure that running the stage again cannot fix (a bad setting, a refused model file,
    an endpoint that refused us after its own retries): the flow does not retry the stage, and
    the message, which names what to change, is logged without a traceback."""


class ConfigError(ValueError, FinalError):
    """A config that cannot be used; the message names the key and what it expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def digest(self) -> str:
        """A short hash of the section, so a stage reruns when its config changes."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_home() -> Path:
    """Where ftflow keeps its state: $FTFLOW_HOME, else .ftflow in the working directory."""
    return Path(os.environ.get("FTFLOW_HOME", ".ftflow")).absolute()


class StageTimeouts(_Section):
    """Seconds each stage may run in the flow before Prefect stops it (then its retries run)."""

    ingest: float = Field(6 * 3600, gt=0, le=MAX_TIMEOUT_S)
    pii: float = Field(6 * 3600, gt=0, le=MAX_TIMEOUT_S)
    dedup: float = Field(6 * 3600, gt=0, le=MAX_TIMEOUT_S)
    curate: float = Field(2 * 3600, gt=0, le=MAX_TIMEOUT_S)
    augment: float = Field(12 * 3600, gt=0, le=MAX_TIMEOUT_S)
    train: float = Field(72 * 3600, gt=0, le=MAX_TIMEOUT_S)
    evaluate: float = Field(6 * 3600, gt=0, le=MAX_TIMEOUT_S)
    export: float = Field(2 * 3600, gt=0, le=MAX_TIMEOUT_S)


class RunConfig(_Section):
    name: str = "ftflow-demo"
    home: str = Field(default_factory=lambda: str(default_home()))
    runs_dir: str = ""  # default: <home>/runs
    tracking_uri: str = ""  # default: $FTFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db
    experiment: str = "ftflow"
    seed: int = 42
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts)

    def resolved_runs_dir(self) -> Path:
        return Path(self.runs_dir or Path(self.home) / "runs")

    def resolved_tracking_uri(self) -> str:
        """run.tracking_uri, else $FTFLOW_TRACKING_URI (a running `ftflow up` stack sets it
        for every ftflow command and for deployed runs), else SQLite in the home.

        Not $MLFLOW_TRACKING_URI: mlflow.set_tracking_uri() writes that variable, so any
        library or script in the process could redirect a run's tracking without a word."""
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("FTFLOW_TRACKING_URI"):
            return os.environ["FTFLOW_TRACKING_URI"]
        return f"sqlite:///{Path(self.home).absolute() / 'mlflow.db'}"


class IngestConfig(_Section):
    inputs: list[str] = Field(default_factory=lambda: [
        "sample_data/*.jsonl", "sample_data/*.csv", "sample_data/*.parquet"])
    languages: list[str] = Field(default_factory=lambda: ["en"])  # []: any, if identified
    # P(wanted language) a record's prose must exceed. A short question beside code scores
    # low even in English ("How do I use httpx? The docs say this:": 0.2); keyboard mash
    # scored 0.23 at most and other languages ~0 (benchmarks/bench_technical.py).
    language_threshold: float = Field(0.25, ge=0.0, le=1.0)
    # ... or, with languages ["en"], P(en) above this for a text shorter than
    # gopher_stop_words_min_words that holds a Gopher stop word (the, to, of, ...; any case):
    # the stop word is the evidence a short question naming a package lacks for fastText
    # ("How do I use cymem? The docs say this:" 0.2). Keyboard mash and other languages hold
    # none. None: off.
    language_short_threshold: float | None = Field(0.05, ge=0.0, le=1.0)
    lid_model: str = ""  # path to lid.176.ftz/bin; default: <home>/assets/lid.176.ftz
    repair_encoding: bool = True  # fix mojibake with ftfy before the filters judge the text
    min_words: int = Field(3, ge=0, le=MAX_WORDS)  # words with a letter or digit, over all turns
    max_chars: int = Field(20_000, gt=0, le=MAX_CHARS)
    gopher_quality: bool = True
    # Gopher's web-page thresholds, adapted to chat: a support exchange is often 15 words.
    gopher_min_doc_words: int = Field(5, ge=1)  # >= 1: Gopher divides by the word count
    # English stop words (the, to, and, ...): Gopher wants 2, a one-line answer may hold one.
    # Applied only when languages == ["en"].
    gopher_min_stop_words: int = Field(1, ge=0)
    # ... asked only of a text of at least this many words (0: of every text, as datatrove): a
    # one-line question beside code may have none; English prose of 15 words has one ~94% of
    # the time, a keyword list has none.
    gopher_stop_words_min_words: int = Field(15, ge=0)
    # Gopher: 80% of words hold a letter; datatrove counts punctuation tokens as words, which
    # puts clean support answers ("Settings > Billing", "5 to 7 days") near 0.8.
    gopher_min_alpha_words_ratio: float = Field(0.5, ge=0.0, le=1.0)
    # Language id and the Gopher rules judge the prose of a turn: code, markup, tables,
    # tracebacks, prompts, URLs, identifiers, versions and flags set aside (tasks/prose.py).
    # The chat thresholds here were set with it on, from benchmarks/bench_technical.py
    # (BENCHMARKS.md: tuned on half of its sources, reported on the other half). false: the
    # whole text is judged, as Gopher's web-page rules assume.
    gopher_prose_only: bool = True
    gopher_repetition: bool = True
    repetition_dup_line_frac: float = Field(0.3, gt=0.0, le=1.0)
    repetition_top_ngram_frac: float = Field(0.3, gt=0.0, le=1.0)  # Gopher: 0.20 for 2-grams
    # The top-n-gram rule weighs an n-gram seen at least this often (1: as datatrove, which
    # counts a one-sentence text's unique n-gram as its repetition).
    repetition_top_ngram_min_count: int = Field(2, ge=1)
    # Share of characters in repeated 5-grams (6- to 10-grams: 0.01 less per word). Gopher's
    # 0.15 is for web pages; short reference docs repeat their phrasing ("returns the
    # arguments that ...") on every line of a list.
    repetition_dup_ngram_frac: float = Field(0.3, ge=0.06, le=1.0)
    refusal_filter: bool = False  # refusal examples are wanted data: off by default
    refusal_patterns: list[str] = Field(
        default_factory=lambda: [r"\bas an ai language model\b", r"\bi cannot (help|assist) with\b"]
    )
    # Token-length bounds, counted with the base model's tokenizer on the record as training
    # renders it (chat template for chats and pairs). 0: off. Off by default: train truncates at
    # train.max_length; set max_tokens to it to drop such records instead of truncating them.
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    max_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    tokenizer: str = ""  # hub id, local folder or builtin:*; "": the run's train.base_model
    # A fastText classifier from `ftflow quality-model train`: records whose P(good) is below
    # quality_threshold are filtered as low_quality. "": off.
    quality_model: str = ""
    quality_threshold: float = Field(0.5, ge=0.0, le=1.0)
    # Bounds while reading raw files, before a line is held in memory: a line, .json array
    # element or text file over max_record_bytes is skipped unread and quarantined with its size;
    # a compressed file decompressing to more than max_decompression_ratio times its compressed
    # size (past the first 64 MiB) is not read further (0: no ratio bound).
    max_record_bytes: int = Field(8 * 1024 * 1024, gt=0)
    max_decompression_ratio: float = Field(100.0, ge=0.0)
    # Filter processes: 0 = one per available CPU (capped), 1 = in the stage's own process.
    workers: int = Field(0, ge=0)

    def digest(self) -> str:
        """As every section's, minus `workers`: the output is the same for any worker count."""
        return _Section.digest(self.model_copy(update={"workers": 0}))

    @field_validator("max_tokens")
    @classmethod
    def _token_bounds(cls, v: int, info: Any) -> int:
        low = info.data.get("min_tokens", 0)
        if v and low > v:
            raise ValueError(f"must be 0 (off) or at least min_tokens ({low})")
        return v


class PiiConfig(_Section):
    # PERSON/LOCATION need spacy_model (NER) or deny_list_persons; listing them alone adds nothing.
    entities: list[Literal[
        "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS",
        "URL_CREDENTIALS", "SECRET", "PERSON", "LOCATION",
    ]] = Field(
        default_factory=lambda: [
            "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE",
            "IP_ADDRESS", "URL_CREDENTIALS", "SECRET", "PERSON", "LOCATION",
        ]
    )
    mode: Literal["placeholder", "pseudonym"] = "placeholder"
    score_threshold: float = Field(0.4, ge=0.0, le=1.0)
    spacy_model: str = ""  # an installed spaCy pipeline with NER enables PERSON/LOCATION
    deny_list_persons: list[str] = Field(default_factory=list)
    # Regions whose national phone formats are recognised; "+<country code>" numbers always are.
    phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB", "DE", "FR", "IL", "IN", "CA", "BR", "AU"]
    )
    batch_size: int = Field(64, gt=0, le=MAX_BATCH)  # texts per spaCy batch
    sample_size: int = Field(50, ge=0, le=100_000)  # rows in redactions_sample.jsonl
    # Analysis processes: 0 = one per available CPU (capped), 1 = in the stage's own process.
    workers: int = Field(0, ge=0, le=MAX_WORKERS)

    def digest(self) -> str:
        """As every section's, minus `workers`: the output is the same for any worker count."""
        return _Section.digest(self.model_copy(update={"workers": 0}))


class DedupSlurmConfig(_Section):
    """Handed to datatrove's SlurmPipelineExecutor as is (dedup.executor: slurm)."""

    partition: str = ""
    time: str = "04:00:00"  # per-task limit (sbatch --time)
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: int = Field(2, ge=1)  # sbatch --mem-per-cpu=<n>G
    qos: str = "normal"  # "": no --qos line
    job_name: str = "ftflow-dedup"  # + "-<datatrove stage>"
    venv_path: str = ""  # activate script the jobs source; "": this interpreter's bin/activate
    env_command: str = ""  # shell lines the jobs run instead (module load ..., conda activate ...)
    sbatch_args: dict[str, str] = Field(default_factory=dict)  # extra `#SBATCH --key=value`
    # datatrove tasks one array job runs one after another: each job pays a Python start
    # (~4.5 CPU-seconds of imports), so short tasks (a bucket task takes well under a second on
    # a small corpus) want several per job.
    tasks_per_job: int = Field(1, ge=1)
    poll_s: int = Field(30, ge=1)  # how often the stage asks squeue whether its jobs are done


class DedupRayConfig(_Section):
    """The cluster and per-task resources for datatrove's RayPipelineExecutor (executor: ray)."""

    address: str = ""  # "": start a local cluster on 127.0.0.1 for the stage; else host:port
    num_cpus: int | None = Field(None, ge=1)  # local cluster only; None: all cores
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(1.0, gt=0)  # memory Ray reserves per task CPU
    tasks_per_job: int = Field(1, ge=1)  # ranks one Ray actor runs (in its own process pool)


class DedupConfig(_Section):
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    eval_max: int = Field(200, ge=0, le=MAX_RECORDS)
    ngram: int = Field(5, ge=1, le=64)
    num_perm: int = Field(128, ge=16, le=4096)
    threshold: float = Field(0.8, gt=0.0, le=1.0)  # true word-n-gram Jaccard to call a duplicate
    # LSH looks for candidates down to this estimated Jaccard; each is then confirmed exactly
    # (lower = fewer pairs near `threshold` missed by MinHash noise, a little slower).
    candidate_threshold: float = Field(0.7, gt=0.0, le=1.0)
    # local: in this process (tasks/dedup_sketch.py, above): the fastest on one machine, but it
    # holds its index in memory (~2.5 KB per record by tracemalloc). datatrove: datatrove's MinHash pipeline on this machine
    # (LocalPipelineExecutor), on disk, streaming; slurm / ray: the same pipeline on a cluster
    # (tasks/dedup_datatrove.py). The same records are removed, naming the same kept ones.
    # auto: local up to local_max_records records, datatrove above.
    executor: Literal["auto", "local", "datatrove", "slurm", "ray"] = "auto"
    local_max_records: int = Field(500_000, ge=0)  # auto: ~3.3 GB of in-process index at most
    tasks: int = Field(4, ge=1, le=100_000)  # datatrove: input shards (signature and filter tasks)
    workers: int = Field(0, ge=0, le=MAX_WORKERS)  # datatrove tasks at once; 0: one per CPU (datatrove), all
    work_dir: str = ""  # datatrove scratch (shards, signatures, logs); "": <out_dir>/_datatrove
    slurm: DedupSlurmConfig = Field(default_factory=DedupSlurmConfig, validate_default=True)
    ray: DedupRayConfig = Field(default_factory=DedupRayConfig)

    @field_validator("slurm")
    @classmethod
    def _slurm_partition(cls, v: DedupSlurmConfig, info: Any) -> DedupSlurmConfig:
        if info.data.get("executor") == "slurm" and not v.partition:
            raise ValueError("dedup.executor is slurm: set dedup.slurm.partition")
        return v

    def digest(self) -> str:
        """As every section's, minus where and how wide it runs (tasks, workers, work_dir,
        slurm, ray): those leave the output unchanged; in-process vs datatrove still counts."""
        data = self.model_dump(mode="json", exclude={"tasks", "workers", "work_dir", "slurm", "ray",
                                                     "local_max_records"})
        data["executor"] = self.executor if self.executor in ("local", "auto") else "datatrove"
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class CurateConfig(_Section):
    """The curated dataset in the ftflow home that training reads, versioned."""

    dataset: str = ""  # its name under <home>/curated/; "": run.name
    # A run on newly arrived files trains only once this many curated records have been added
    # since the last version a run trained on; below it, the run ends after curation.
    min_new_records: int = Field(50, ge=1)


class TeacherConfig(_Section):
    kind: Literal["transformers", "openai"] = "transformers"
    model: str = "builtin:tiny-llama"  # a hub id, a local path, or builtin:tiny-llama
    base_url: str = ""  # OpenAI-compatible endpoint, for kind=openai
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored
    temperature: float = Field(0.7, ge=0.0, le=10.0)
    max_new_tokens: int = Field(96, gt=0, le=MAX_TOKENS)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # transformers teacher only
    # kind=openai: a request that has not answered in timeout_s is cut off; timeouts, dropped
    # connections, 429 and 5xx are retried max_retries times (backoff_s doubling, with jitter,
    # and at least the server's Retry-After); concurrency requests are in flight at once.
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    max_backoff_s: float = Field(60.0, ge=0)
    concurrency: int = Field(4, ge=1)
    # Every answer is kept in <home>/cache/teacher, keyed by (endpoint, model, prompt, params):
    # a rerun (after a crash) asks only for what it does not have yet.
    cache: bool = True


# Teacher settings that change how generation runs, not what it produces.
TEACHER_RUNTIME_KEYS = {"timeout_s", "max_retries", "backoff_s", "max_backoff_s", "concurrency",
                        "cache", "device"}
AUGMENT_STRATEGIES = ("fresh_reply", "paraphrase", "self_instruct", "evolve", "doc_qa",
                      "preference")


class SyntheticJudgeConfig(_Section):
    """LLM-as-judge (the teacher): a 1-5 rubric of relevance, accuracy and format."""

    enabled: bool = False
    min_score: int = Field(4, ge=1, le=5)  # rows scored below it are rejected (synthetic_judge)


class AugmentConfig(_Section):
    enabled: bool = True
    # Rows each strategy tries to generate (its quota), e.g. {fresh_reply: 8, evolve: 4}:
    # fresh_reply (a new final reply to a seed chat), paraphrase (the user turn reworded, then
    # answered), self_instruct (a new instruction from seeds of one domain, answered), evolve
    # (the instruction made more complex, Evol-Instruct style, answered), doc_qa (a question and
    # answer from a plain-text record), preference (a prompt with the teacher's reply as chosen
    # and the base model's as rejected, for DPO/ORPO). Empty: {fresh_reply: max_seed_records}.
    strategies: dict[str, int] = Field(default_factory=dict)
    max_seed_records: int = Field(16, ge=0, le=MAX_RECORDS)
    seed: int = 0  # which train records become seeds (deterministic for a given seed)
    batch_size: int = Field(16, gt=0, le=MAX_BATCH)  # rows per teacher batch (>= teacher.concurrency)
    # Synthetic rows are at most this share of the training set (real + synthetic).
    max_synthetic_share: float = Field(0.5, ge=0.0, le=1.0)
    self_instruct_examples: int = Field(3, ge=1)  # seed instructions shown per new instruction
    # preference: the model whose reply is "rejected"; "": train.base_model
    rejected_model: str = ""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    # Validation of every generation: failures are filtered as synthetic_invalid.
    min_words: int = Field(4, ge=0, le=MAX_WORDS)
    max_chars: int = Field(4000, gt=0, le=MAX_CHARS)
    min_printable_ratio: float = Field(0.95, ge=0.0, le=1.0)
    # Share of whitespace tokens that are words (letters, with surrounding punctuation allowed):
    # word salad from a weak teacher (mixed digits/letters, fragments) falls below it.
    min_word_token_ratio: float = Field(0.75, ge=0.0, le=1.0)
    # Language of each reply (fastText lid.176, as at ingest): its most likely language must be
    # one of these, with at least language_threshold (low: lid.176.ftz gives a clean 12-word
    # English reply 0.38), else synthetic_language. []: no check.
    languages: list[str] = Field(default_factory=lambda: ["en"])
    language_threshold: float = Field(0.2, ge=0.0, le=1.0)
    json_schema: str = ""  # a JSON-schema file every reply must parse and satisfy; "": off
    # Word-5-gram Jaccard at which a row duplicates a real or an earlier synthetic row.
    near_duplicate_threshold: float = Field(0.8, gt=0.0, le=1.0)
    judge: SyntheticJudgeConfig = Field(default_factory=SyntheticJudgeConfig)
    sample_size: int = Field(20, ge=0)  # accepted and rejected rows in synthetic_samples.json

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, v: dict[str, int]) -> dict[str, int]:
        for name, quota in v.items():
            if name not in AUGMENT_STRATEGIES:
                raise ValueError(f"unknown strategy {name!r} (one of {', '.join(AUGMENT_STRATEGIES)})")
            if not isinstance(quota, int) or quota < 0:
                raise ValueError(f"{name}: the quota must be a whole number >= 0")
        return v

    def quotas(self) -> dict[str, int]:
        """Rows each strategy tries to generate (strategies, else fresh_reply: max_seed_records)."""
        return dict(self.strategies) if self.strategies else {"fresh_reply": self.max_seed_records}

    def digest(self) -> str:
        """As every section's, minus the teacher's runtime settings (retries, concurrency, ...)."""
        data = self.model_dump(mode="json")
        data["teacher"] = {k: v for k, v in data["teacher"].items()
                           if k not in TEACHER_RUNTIME_KEYS}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class LoraConfig(_Section):
    r: int = Field(16, gt=0, le=4096)
    alpha: int = Field(32, gt=0, le=65_536)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False


class TrainConfig(_Section):
    base_model: str = "builtin:tiny-llama"  # a hub id, a local folder, or builtin:tiny-llama
    method: Literal["qlora", "lora"] = "qlora"
    trust_remote_code: bool = False
    # Base weights are loaded from safetensors only; true also loads pickle checkpoints
    # (pytorch_model.bin), which can run code when loaded: only for a model you trust.
    allow_pickle: bool = False
    chat_template: Literal["auto", "chatml", "llama-3", "alpaca"] = "auto"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0, le=10.0)
    epochs: float = Field(3.0, gt=0, le=1000)
    max_steps: int = Field(-1, ge=-1, le=MAX_STEPS)  # -1: epochs decide
    batch_size: int = Field(8, gt=0, le=MAX_BATCH)
    grad_accum: int = Field(1, gt=0, le=MAX_BATCH)
    # auto: paged_adamw_8bit on CUDA; adamw_torch on CPU, where bitsandbytes' 8-bit AdamW runs
    # but ~10x slower per step and LoRA's optimizer state is small anyway. Any transformers name.
    optimizer: str = "auto"
    max_length: int = Field(512, gt=0, le=MAX_TOKENS)
    assistant_only_loss: bool = True
    packing: bool = False
    # Batches of similar lengths pad less (length-grouped sampler): 1.6x the real tokens/s of a
    # random order on 2 CPU cores (benchmarks/results/train_cpu.md). Packing (trl's bfd, padding-
    # free) is exact but ~4x slower on CPU: without flash-attention varlen kernels a packed batch
    # is one long sequence with a block-diagonal mask, so attention grows with the whole batch.
    group_by_length: bool = True
    # Recompute activations in the backward pass (trl's default too): less memory, and on CPU it
    # was no slower (less memory traffic).
    gradient_checkpointing: bool = True
    eval_steps: int = Field(50, gt=0, le=MAX_STEPS)
    save_steps: int = Field(50, gt=0, le=MAX_STEPS)
    logging_steps: int = Field(5, gt=0, le=MAX_STEPS)
    # Stop after this many evaluations without an eval-loss improvement larger than the threshold
    # and export the best checkpoint (saving then happens at every evaluation). 0: off.
    early_stopping_patience: int = Field(0, ge=0, le=10_000)
    early_stopping_threshold: float = Field(0.0, ge=0.0)
    # sft: learn the replies (a preference pair counts as prompt + chosen). dpo / orpo (trl): learn
    # from preference pairs which reply is better (tasks/train_pref.py). trl 1.16 has no separate
    # prompt limit: a pair whose prompt alone fills max_length is dropped, a long reply truncated.
    objective: Literal["sft", "dpo", "orpo"] = "sft"
    # trl's `beta` for both: DPO's beta (higher stays closer to the base model), ORPO's lambda
    # (the weight of the odds-ratio term next to the chosen reply's NLL).
    beta: float = Field(0.1, gt=0, le=100.0)

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be -1 (train.epochs decide) or a positive number of steps")
        return v


EVAL_METRICS = (
    "ftflow_heldout_ppl.word_perplexity", "ftflow_heldout_ppl.byte_perplexity",
    "ftflow_heldout_ppl.bits_per_byte", "ftflow_heldout_mc.acc", "ftflow_heldout_mc.acc_norm",
    "ftflow_heldout_mc.acc_mutual_info",
)


class ReplyJudgeConfig(_Section):
    """LLM-as-judge: base and tuned reply to held-out prompts, the teacher endpoint picks the
    better reply (each pair twice, A/B swapped); the tuned model's win rate is reported."""

    enabled: bool = False
    max_prompts: int = Field(16, gt=0)
    max_new_tokens: int = Field(48, gt=0)  # reply length of base and tuned
    teacher: TeacherConfig | None = None  # an OpenAI-compatible endpoint; None: augment.teacher
    min_win_rate: float | None = Field(None, ge=0.0, le=1.0)  # also gate on it when set
    timeout_s: float = Field(60.0, gt=0)


# Renamed keys of the evaluate section: old configs keep working.
EVALUATE_RENAMED = {"gate_metric": "targets", "gate_min_improvement": "min_gain"}


class EvaluateConfig(_Section):
    max_samples: int = Field(100, gt=0, le=MAX_RECORDS)
    num_choices: int = Field(4, ge=2, le=26)
    batch_size: int = Field(8, gt=0, le=MAX_BATCH)
    seed: int = 0  # picks the multiple-choice distractors and the general passages
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The gate: every target metric gains at least min_gain (relative for perplexities and bits
    # per byte: 0.05 = 5% better than base; absolute for accuracies: 0.05 = 5 points), an
    # accuracy also at least min_gain_stderrs standard errors of the difference
    # (sqrt(base_stderr^2 + tuned_stderr^2)); every general task loses at most max_regression
    # (relative).
    targets: list[str] = Field(default_factory=lambda: ["ftflow_heldout_ppl.word_perplexity"])
    min_gain: float = 0.0
    min_gain_stderrs: float = Field(1.0, ge=0.0)
    max_regression: float = Field(0.10, ge=0.0)
    # General tasks (the forgetting check): held-out passages of the builtin base's pretraining
    # prose (0 = none; judged on bits per byte), and lm-eval task names ("task" or
    # "task.metric"; a bare task on acc_norm, acc, exact_match, ...), each run only when
    # its data is available offline, else skipped with the reason.
    general_prose: int = Field(64, ge=0)
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_include_path: str = ""  # a folder of your own lm-eval task YAMLs
    lm_eval_limit: int | None = Field(None, gt=0)  # at most this many documents per task
    judge: ReplyJudgeConfig = Field(default_factory=ReplyJudgeConfig)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in EVALUATE_RENAMED):
            data = dict(data)
            for old, new in EVALUATE_RENAMED.items():
                if old not in data:
                    continue
                if new in data:
                    raise ValueError(f"evaluate.{old} was renamed evaluate.{new}: give only "
                                     f"evaluate.{new}")
                value = data.pop(old)
                data[new] = [value] if new == "targets" else value
        return data

    @field_validator("targets")
    @classmethod
    def _known_metric(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one target metric")
        for metric in v:
            if metric not in EVAL_METRICS:
                raise ValueError(f"{metric!r}: must be one of {', '.join(EVAL_METRICS)}")
        return v

    @property
    def gate_metric(self) -> str:
        """The first target: the score export compares with the champion's."""
        return self.targets[0]


class ExportConfig(_Section):
    model_name: str = "ftflow-demo"
    alias: str = "candidate"
    register_if_gate_fails: bool = False
    experiment: str = "ftflow"  # used only when no parent run is given
    max_new_tokens: int = Field(64, gt=0, le=MAX_TOKENS)  # default reply length of the served model
    # Move `champion` when the gate passed and the version beats the champion's target score.
    champion: bool = True
    gguf: list[Literal["f16", "q8_0"]] = Field(default_factory=lambda: ["f16", "q8_0"])  # []: none
    system_prompt: str = ""  # the Ollama Modelfile's SYSTEM (empty: none)
    ollama_parameters: dict[str, float] = Field(
        default_factory=lambda: {"temperature": 0.7, "top_p": 0.9})


class PipelineConfig(BaseModel):
    """The whole run, validated before the first stage starts."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    run: RunConfig = Field(default_factory=RunConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("ingest")
    @classmethod
    def _inputs_given(cls, v: IngestConfig) -> IngestConfig:
        if not v.inputs:
            raise ValueError("ingest.inputs must name at least one file, glob or URL")
        return v


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (or the embedded defaults), apply key=value overrides, validate."""
    data: dict[str, Any] = {}
    origin = "embedded defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data, origin = loaded, str(p)
    for ov in overrides or []:
        _apply_override(data, ov)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None
