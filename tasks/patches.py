"""Every place ftflow reaches into a pinned library's internals, in one table.

Each entry names the distribution, the exact version the code was written against, where the
code lives, what it changes and why, and the test that fails if the patch stops working.
``tests/test_patches.py`` fails as soon as an installed version differs from the one an entry
was written against, naming the entry and the test to re-check; update ``version`` here once
that test passes on the new release.

``via`` is empty for a library pinned in pyproject.toml; for a transitive one (not pinned
there) it names the pinned dependency that brings it in, so moving that pin can move it too.

This module imports nothing but the standard library: reading the table loads no patched code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Patch:
    library: str  # distribution name, as importlib.metadata.version() takes it
    version: str  # the exact version the patch was written against
    where: str  # "module:attribute" (an attribute may be "Class.method")
    what: str  # what it changes
    why: str  # why it must
    test: str  # pytest node id of the test that fails if the patch stops working
    via: str = ""  # the pyproject.toml pin that brings in an unpinned (transitive) library


PATCHES: tuple[Patch, ...] = (
    Patch(
        "trl", "1.16.0", "tasks.train_steps:cpu_logprob_tiles",
        "sets trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE and trl.trainer.utils."
        "_CHUNKED_LOGPROB_CHUNK_SIZE / _use_triton while training on CPU, restored afterwards",
        "without Triton trl's fused LM head scores every position in 4096 x 32768 tiles "
        "(~96% of a CPU step's peak tensors); smaller tiles on labelled positions only give the "
        "same loss and gradients",
        "tests/test_train.py::test_cpu_logprob_tiles_keep_trls_loss_and_gradients_in_smaller_tiles",
    ),
    Patch(
        "trl", "1.16.0", "tasks.train_steps:step_stats_callback",
        "reads the trainers' private _total_train_tokens (SFT, DPO) for train_tokens and "
        "tokens_per_s, and wraps trainer.training_step to count batches where it is absent (ORPO)",
        "trl keeps its token count in a private attribute; a rename would zero the token metrics "
        "or count them twice",
        "tests/test_train.py::test_history_rows_carry_tokens_per_s_and_peak_memory",
    ),
    Patch(
        "bitsandbytes", "0.50.2", "tasks.train_model:_keep_4bit_trainable",
        "sets support_avx512bf16_for_cpu = False on every Linear4bit",
        "on a CPU with AVX512-BF16 an eval forward without grad repacks 4-bit weights into an "
        "inference layout without autograd; LoRA gradients then come out ~10x too small",
        "tests/test_train.py::test_4bit_layers_still_backpropagate_after_an_evaluation",
    ),
    Patch(
        "phonenumbers", "9.0.43", "tasks.pii:_ShortCandidateSkippingMatcher",
        "subclasses PhoneNumberMatcher, overriding its private _extract_match and "
        "_parse_and_verify hooks to reject candidates shorter than any valid number",
        "parsing every date, version and count once per region was most of the PII stage's "
        "time; the skip changes no match",
        "tests/test_patches.py::test_phonenumbers_matcher_hooks_are_called_and_change_no_match",
        via="presidio-analyzer",
    ),
    Patch(
        "presidio-analyzer", "2.2.366", "tasks.pii:_PhoneRecognizer",
        "replaces PhoneRecognizer.analyze (region pre-check, the skipping matcher, look-alike "
        "filter) and builds results with its private _get_recognizer_result",
        "the stock analyze runs every region's matcher on every text and re-parses each match",
        "tests/test_patches.py::test_presidio_phone_recognizer_finds_what_the_stock_one_finds",
    ),
    Patch(
        "presidio-analyzer", "2.2.366", "tasks.pii:_engine",
        "assigns SpacyNlpEngine.nlp = {'en': <our spaCy pipeline>} before AnalyzerEngine sees it",
        "AnalyzerEngine loads an engine whose nlp is unset, which downloads a spaCy model; none "
        "is on PyPI, and runs are offline",
        "tests/test_patches.py::test_presidio_uses_the_preloaded_pipeline_offline",
    ),
    Patch(
        "presidio-analyzer", "2.2.366", "tasks.pii:_lower_lemma",
        "a spaCy component (ftflow_lower_lemma) writing lowercased tokens as lemmas",
        "presidio's context enhancer matches context words ('phone', 'ssn') against lemmas, "
        "which a blank spaCy pipeline leaves empty",
        "tests/test_patches.py::test_lowercase_lemmas_let_presidio_context_words_score",
    ),
    Patch(
        "distilabel", "1.5.3", "tasks.augment_strategies:run_task",
        "runs each strategy's distilabel Task through its own process(), outside a Pipeline, and "
        "sets the distilabel.step logger to ERROR (a step made outside a Pipeline warns once)",
        "the stage needs per-request resume, progress and its ledger in one process; a Pipeline "
        "starts step subprocesses (fork-unsafe after torch threads) and keeps a batch cache",
        "tests/test_augment_strategies.py::"
        "test_every_strategy_generates_its_quota_and_the_ledger_adds_up",
    ),
    Patch(
        "ray", "2.60.0", "tasks.dedup_datatrove:_loopback_only",
        "sets ray._private.ray_constants.ENABLE_RAY_CLUSTER = False and "
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 while a local cluster runs, restored afterwards",
        "so a local cluster's node IP is 127.0.0.1 and its processes listen on the loopback only; "
        "ray reads the variable once, on import, so the constant is switched too",
        "tests/test_patches.py::test_ray_loopback_switch_gives_a_loopback_node_ip",
    ),
    Patch(
        "datatrove", "0.10.1", "tasks.dedup_datatrove:ShingleSignature",
        "subclasses MinhashDedupSignature, overriding get_shingles and get_signature (reads its "
        "num_hashes and config.hash_config)",
        "datatrove's buckets must be the in-process LSH bands (ftflow's shingles, datasketch's "
        "hashes), so both engines remove the same records",
        "tests/test_patches.py::test_datatrove_signature_step_writes_the_overridden_bands",
    ),
    Patch(
        "datatrove", "0.10.1", "tasks.dedup_datatrove:_prepare_filter_inputs",
        "creates an empty {rank:06d}.remove and .clusters file for every rank before the filter",
        "MinhashDedupFilter skips loading cluster ids for a rank without a .remove file, so a "
        "rank holding only kept cluster roots would lose them",
        "tests/test_patches.py::test_datatrove_filter_needs_a_remove_file_to_load_cluster_ids",
    ),
    Patch(
        "datatrove", "0.10.1", "tasks.dedup_datatrove:_preload_forkserver",
        "preloads this module in multiprocess's forkserver, which LocalPipelineExecutor's "
        "default start method uses",
        "otherwise every local worker imports prefect, datasketch and datatrove again "
        "(~4 s each on 2 cores)",
        "tests/test_patches.py::test_datatrove_local_workers_start_from_multiprocess_forkserver",
    ),
    Patch(
        "datatrove", "0.10.1", "tasks.words:RunCachedWordTokenizer",
        "a WordTokenizer giving SpaCyTokenizer('en')'s words: each distinct whitespace-free run "
        "split once by spaCy's algorithm on spaCy's English rules (tasks.words:EnglishRules), "
        "a text whose runs need spaCy's special-case pass tokenized by spaCy whole",
        "datatrove builds spaCy Doc/Token objects for every record inside memory_zone() (40% of "
        "ingest), and spacy.blank loads presidio, transformers and torch through an entry point",
        "tests/test_words.py::test_words_are_exactly_datatrove_spacy_words",
    ),
    Patch(
        "spacy", "3.8.18", "tasks.words:EnglishRules",
        "ports Tokenizer._split_affixes/_attach_tokens (tokenizer.pyx) to Python on "
        "English.Defaults' prefix/suffix/infix/URL regexes and exceptions, and rebuilds which "
        "exceptions the special-case matcher holds (faster_heuristics) and how they re-split",
        "spaCy's tokenizer on each run not seen before (order numbers, versions, IDs) was ~12% "
        "of ingest; thinc is imported with torch hidden",
        "tests/test_words.py::test_words_match_spacy_on_symbol_soup",
        via="presidio-analyzer",
    ),
    Patch(
        "datatrove", "0.10.1", "tasks.words:FastGopherRepetitionFilter",
        "subclasses GopherRepetitionFilter, overriding filter (reads its thresholds and private "
        "_line_splitter / paragraph_exp) with the same rules: a bound before counting top "
        "n-grams, duplicate n-grams walked over the windows that can repeat",
        "datatrove's pure-Python n-gram search was a quarter of ingest's time",
        "tests/test_words.py::test_gopher_rules_decide_as_datatrove",
    ),
    Patch(
        "datatrove", "0.10.1", "tasks.words:FastGopherQualityFilter",
        "subclasses GopherQualityFilter, overriding filter (reads its thresholds) with the same "
        "rules on per-run sums of the per-word questions",
        "the per-word generator expressions were a third of what remained after tokenizing",
        "tests/test_words.py::test_gopher_rules_decide_as_datatrove",
    ),
    Patch(
        "datatrove", "0.10.1", "tasks.ingest:LocalLanguageFilter",
        "subclasses LanguageFilter, adding filter_batch: one fastText call per batch for the 2 "
        "best labels, datatrove's own filter where the best label is tied or not wanted",
        "datatrove's per-record predict asks for all 176 labels; fastText lid was ~20% of ingest",
        "tests/test_words.py::test_language_batch_decides_as_datatrove",
    ),
    Patch(
        "datatrove", "0.10.1", "tasks.ingest:_run_filter",
        "runs a BaseFilter over a list (filter_batch, exclusion writer, filter_reason) in "
        "place of BaseFilter.run, without its per-document stats",
        "datatrove's step/batch/stat plumbing was ~10% of ingest",
        "tests/test_words.py::test_judge_decides_as_datatrove_filters",
    ),
    Patch(
        "datatrove", "0.10.1", "tasks.ingest:LocalFT176LID",
        "subclasses FT176LID, overriding its model property (private _model) to load a local "
        "lid.176 file; LocalLanguageFilter replaces LanguageFilter.model with it",
        "FT176LID downloads lid.176.bin from a URL; runs are offline and use lid.176.ftz",
        "tests/test_patches.py::test_language_filter_reads_the_local_model_and_never_downloads",
    ),
    Patch(
        "fasttext-numpy2-wheel", "0.9.2", "tasks.ingest:_load_fasttext",
        "loads lid.176 with the private fasttext.FastText._FastText, as datatrove's FT176LID does",
        "the same loader datatrove's language filter uses; in this build the public "
        "fasttext.load_model only wraps it, so either would do",
        "tests/test_patches.py::test_fasttext_private_loader_loads_and_predicts",
    ),
    Patch(
        "fasttext-numpy2-wheel", "0.9.2", "tasks.augment_validate:LanguageCheck",
        "loads lid.176 with the private fasttext.FastText._FastText to check synthetic replies",
        "as tasks.ingest:_load_fasttext, without importing datatrove into the augment stage",
        "tests/test_patches.py::test_fasttext_private_loader_loads_and_predicts",
    ),
    Patch(
        "fasttext-numpy2-wheel", "0.9.2", "tasks.quality:_load",
        "loads quality models with the private fasttext.FastText._FastText",
        "as tasks.ingest:_load_fasttext; in this build the public fasttext.load_model only "
        "wraps it, so either would do",
        "tests/test_patches.py::test_fasttext_private_loader_loads_and_predicts",
    ),
    Patch(
        "fasttext-numpy2-wheel", "0.9.2", "tasks.quality:_zero_filled_malloc",
        "glibc mallopt(M_PERTURB, 0xFF) while fastText trains: every allocation starts zeroed",
        "this build's train_supervised leaves ~90% of its input matrix uninitialised (thread=1), "
        "so a dirty heap gave NaN or a worse model",
        "tests/test_quality.py::test_the_same_examples_train_the_same_model_on_a_dirty_heap",
    ),
    Patch(
        "prefect", "3.8.8", "flows.env:OFFLINE_ENV",
        "sets PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180 and "
        "PREFECT_SERVER_ANALYTICS_ENABLED=false",
        "the temporary server needs more than the 20 s default on a busy 2-core machine; "
        "analytics fail offline and lock a fresh SQLite; Prefect ignores unknown names silently",
        "tests/test_patches.py::test_prefect_reads_the_offline_settings",
    ),
    Patch(
        "tldextract", "5.4.0", "flows.env:OFFLINE_ENV",
        "sets TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS to empty",
        "presidio's email recognizer would otherwise try to fetch the public suffix list, "
        "offline, before falling back to its bundled snapshot",
        "tests/test_patches.py::test_tldextract_fetches_no_suffix_list",
        via="presidio-analyzer",
    ),
)
