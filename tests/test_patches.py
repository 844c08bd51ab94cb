"""The table of patched library internals (tasks/patches.py) holds, and each patch still works.

The table tests read source files and package metadata only: they import none of the patched
libraries. The behavioural tests below cover the patches no other test file exercises; each
imports its library inside the test and fails if the internals it relies on move.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import os
import re
import struct
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from tasks.patches import PATCHES, Patch

REPO = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    """pyproject.toml's exact pins (`name==version`), runtime and optional dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    pins = {}
    for spec in specs:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;,]+)", spec)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def _top_level_names(path: Path) -> dict[str, ast.AST]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


def _label(patch: Patch) -> str:
    return f"{patch.library}@{patch.where}"


@pytest.fixture(params=PATCHES, ids=_label)
def patch(request: pytest.FixtureRequest) -> Patch:
    return request.param


def test_the_table_imports_only_the_standard_library() -> None:
    tree = ast.parse((REPO / "tasks" / "patches.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "dataclasses"}, imported


def test_installed_version_is_the_one_the_patch_was_written_against(patch: Patch) -> None:
    installed = importlib.metadata.version(patch.library)
    assert installed == patch.version, (
        f"{patch.library} is {installed}, but the patch at {patch.where} was written against "
        f"{patch.version} ({patch.what}). Re-check it: run {patch.test}, then set its version "
        "in tasks/patches.py")


def test_the_named_test_exists(patch: Patch) -> None:
    path, _, name = patch.test.partition("::")
    file = REPO / path
    assert file.is_file(), f"{_label(patch)}: no test file {path}"
    node = _top_level_names(file).get(name)
    assert isinstance(node, ast.FunctionDef) and name.startswith("test_"), (
        f"{_label(patch)}: {path} has no test function {name}")


def test_where_names_an_existing_attribute(patch: Patch) -> None:
    module, _, attr = patch.where.partition(":")
    file = REPO / Path(*module.split(".")).with_suffix(".py")
    assert file.is_file(), f"{_label(patch)}: no module file for {module}"
    owner, _, member = attr.partition(".")
    node = _top_level_names(file).get(owner)
    assert node is not None, f"{_label(patch)}: {module} has no top-level {owner}"
    if member:
        assert isinstance(node, ast.ClassDef) and any(
            getattr(n, "name", None) == member for n in node.body), (
            f"{_label(patch)}: {module}.{owner} has no {member}")


def test_the_table_matches_the_pyproject_pins(patch: Patch) -> None:
    pins = _pins()
    name = _norm(patch.library)
    if not patch.via:
        assert pins.get(name) == patch.version, (
            f"{_label(patch)}: written against {patch.library}=={patch.version}, pyproject.toml "
            f"pins {pins.get(name, 'nothing')}")
        return
    assert name not in pins, f"{_label(patch)}: {patch.library} is pinned; drop `via`"
    assert _norm(patch.via) in pins, f"{_label(patch)}: via {patch.via} is not pinned"
    requires = importlib.metadata.requires(patch.via) or []
    assert any(_norm(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) == name for r in requires), (
        f"{_label(patch)}: {patch.via} does not depend on {patch.library}")


def test_every_entry_is_one_patch() -> None:
    keys = Counter((p.library, p.where) for p in PATCHES)
    assert not [k for k, n in keys.items() if n > 1]


# --- behavioural tests of patches no other test file covers ------------------------------------

# Real numbers in three regions among dates, versions, counts and a German date phonenumbers
# reads as a number: candidates too short to be numbers, and matches on either side of them.
PHONE_TEXTS = [
    "Call +1 650-253-0000 or (650) 253-0001 before 12/03, ticket 42, build v1.2.3.",
    "Ring our London office on 020 7946 0958 or +44 20 7946 0018; room 12, floor 3.",
    "Tel. +49 30 901820, Fax 030 90182-1; Termin am 06.05.2024 um 10:30 Uhr.",
    "1-800-FLOWERS, then 555 0199, 42, 7 and 2024 - no numbers here.",
]


def test_phonenumbers_matcher_hooks_are_called_and_change_no_match() -> None:
    import phonenumbers

    from tasks.pii import _ShortCandidateSkippingMatcher, phone_min_digits

    for hook in ("_extract_match", "_parse_and_verify"):
        stock = getattr(phonenumbers.PhoneNumberMatcher, hook, None)
        assert callable(stock), f"phonenumbers.PhoneNumberMatcher.{hook} is gone"
        assert list(inspect.signature(stock).parameters) == ["self", "candidate", "offset"], hook
    skipped: list[str] = []

    class Recording(_ShortCandidateSkippingMatcher):
        def _too_short(self, candidate: str) -> bool:
            short = super()._too_short(candidate)
            if short:
                skipped.append(candidate)
            return short

    found = 0
    for region in ("US", "GB", "DE"):
        for text in PHONE_TEXTS:
            stock = [(m.start, m.raw_string) for m in
                     phonenumbers.PhoneNumberMatcher(text, region, leniency=1)]
            ours = [(m.start, m.raw_string) for m in
                    Recording(text, region, 1, phone_min_digits(region))]
            assert ours == stock, (region, text)
            found += len(stock)
    assert found >= 10
    # phonenumbers still routes its candidates through the overridden hooks.
    assert {"42", "12/03"} <= set(skipped)


def test_presidio_phone_recognizer_finds_what_the_stock_one_finds() -> None:
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    from tasks.pii import _PhoneRecognizer

    builder = PhoneRecognizer._get_recognizer_result
    assert list(inspect.signature(builder).parameters) == [
        "self", "match", "text", "region", "nlp_artifacts"]
    regions = ("US", "GB", "DE")
    ours, stock = _PhoneRecognizer(regions), PhoneRecognizer(supported_regions=regions, leniency=1)
    texts = [t.replace("06.05.2024", "Montag") for t in PHONE_TEXTS]  # a date we drop on purpose

    def key(results: list) -> list[tuple]:
        return sorted((r.entity_type, r.start, r.end, r.score) for r in results)

    total = 0
    for text in texts:
        expected = key(stock.analyze(text, ["PHONE_NUMBER"]))
        assert key(ours.analyze(text, ["PHONE_NUMBER"])) == expected, text
        total += len(expected)
    assert total >= 6


def test_presidio_uses_the_preloaded_pipeline_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import spacy
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    from tasks.pii import _engine

    # A fresh engine is "not loaded" until its nlp is set: AnalyzerEngine would load it.
    assert not SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank"}]).is_loaded()

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("presidio tried to load or download a spaCy model")

    monkeypatch.setattr(spacy, "load", no_model)
    monkeypatch.setattr(spacy.cli, "download", no_model)
    engine = _engine.__wrapped__(("EMAIL_ADDRESS", "PHONE_NUMBER"), "", (), ("US",))
    assert "ftflow_lower_lemma" in engine.analyzer.nlp_engine.get_nlp("en").pipe_names
    found = engine.analyzer.analyze("Mail jane.doe@example.org or call +1 650-253-0000.",
                                    language="en", entities=list(engine.entities))
    assert sorted(r.entity_type for r in found) == ["EMAIL_ADDRESS", "PHONE_NUMBER"]


def test_lowercase_lemmas_let_presidio_context_words_score() -> None:
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    from tasks.pii import _engine

    engine = _engine(("PHONE_NUMBER",), "", (), ("US",))
    blank = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    blank.nlp = {"en": spacy.blank("en")}  # no lemmas: what the component fixes
    without = AnalyzerEngine(registry=engine.analyzer.registry, nlp_engine=blank)

    def score(analyzer: AnalyzerEngine, text: str) -> float:
        (result,) = analyzer.analyze(text, language="en", entities=["PHONE_NUMBER"])
        return result.score

    plain, context = "Our office: 650-253-0000.", "Our office PHONE: 650-253-0000."
    assert score(engine.analyzer, context) > score(engine.analyzer, plain)
    assert score(without, context) == score(without, plain)


def test_ray_loopback_switch_gives_a_loopback_node_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private import ray_constants, services

    from tasks.dedup_datatrove import _RAY_CLUSTER_SWITCH, _loopback_only

    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == _RAY_CLUSTER_SWITCH
    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    monkeypatch.delenv(_RAY_CLUSTER_SWITCH, raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    with _loopback_only():
        assert services.get_node_ip_address() == "127.0.0.1"
        # What the GCS, raylet and workers compute on import from the inherited variable.
        assert ray_constants.env_bool(_RAY_CLUSTER_SWITCH, True) is False
    assert ray_constants.ENABLE_RAY_CLUSTER is before
    assert _RAY_CLUSTER_SWITCH not in os.environ


def test_datatrove_signature_step_writes_the_overridden_bands(tmp_path: Path) -> None:
    from datatrove.data import Document

    from data_contracts.config import DedupConfig
    from tasks.dedup_datatrove import ShingleSignature, minhash_config

    cfg = DedupConfig()
    mh = minhash_config(cfg)
    calls: Counter[str] = Counter()

    class Recording(ShingleSignature):
        def get_shingles(self, text: str):  # type: ignore[no-untyped-def]
            calls["shingles"] += 1
            return super().get_shingles(text)

        def get_signature(self, shingles):  # type: ignore[no-untyped-def]
            calls["signature"] += 1
            return super().get_signature(shingles)

    texts = ["the quick brown fox jumps over the lazy dog " * 3, "Hi!", "an entirely other text"]
    step = Recording(str(tmp_path), mh, cfg.num_perm)
    out = step.run(iter([Document(text=t, id=str(i)) for i, t in enumerate(texts)]), 0, 1)
    list(out or [])
    assert calls == {"shingles": len(texts), "signature": len(texts)}
    # What datatrove wrote into each bucket file is our band for that doc.
    record = struct.Struct(f"<{mh.hashes_per_bucket}{mh.hash_config.struct_format}I")
    written: dict[int, list[list[int]]] = {i: [] for i in range(len(texts))}
    for bucket in range(mh.num_buckets):
        data = (tmp_path / f"bucket_{bucket:03d}" / "00000.minhash.sig").read_bytes()
        rows = sorted(record.iter_unpack(data), key=lambda row: row[-1])
        assert [row[-1] for row in rows] == list(range(len(texts)))
        for row in rows:
            written[row[-1]].append(list(row[:-1]))
    plain = ShingleSignature(str(tmp_path / "unused"), mh, cfg.num_perm)
    for i, text in enumerate(texts):
        assert written[i] == plain.get_signature(plain.get_shingles(text)), text


def test_datatrove_filter_needs_a_remove_file_to_load_cluster_ids(tmp_path: Path) -> None:
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashDedupFilter

    from tasks.dedup_datatrove import WorkDir, _prepare_filter_inputs

    work = WorkDir(tmp_path)
    work.remove.mkdir(parents=True)
    # What the cluster step writes for a rank holding only a kept root (doc 1 of cluster 7):
    # a .clusters file and no .remove file.
    clusters = struct.pack("<II", 1, 7)
    (work.remove / "000000.clusters").write_bytes(clusters)

    def cluster_ids() -> list[int | None]:
        step = MinhashDedupFilter(str(work.remove), load_cluster_ids=True)
        docs = [Document(text=f"doc {i}", id=str(i)) for i in range(3)]
        return [d.metadata.get("minhash_cluster_id") for d in step.run(iter(docs), 0, 1)]

    assert cluster_ids() == [None, None, None]  # datatrove skips the ids: why the patch exists
    _prepare_filter_inputs(work, tasks=1)
    assert (work.remove / "000000.clusters").read_bytes() == clusters  # left as it was
    assert cluster_ids() == [-1, 7, -1]


def test_datatrove_local_workers_start_from_multiprocess_forkserver() -> None:
    import multiprocess
    from datatrove.executor import local

    params = inspect.signature(local.LocalPipelineExecutor).parameters
    assert params["start_method"].default == "forkserver"
    assert local.multiprocess is multiprocess
    assert "multiprocess.get_context(self.start_method)" in inspect.getsource(local)


def test_language_filter_reads_the_local_model_and_never_downloads(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datatrove.utils.lid as lid
    from datatrove.data import Document

    from tasks.assets import ensure_lid_model
    from tasks.ingest import LocalFT176LID, LocalLanguageFilter

    path = ensure_lid_model(home)

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("datatrove tried to download its language-id model")

    monkeypatch.setattr(lid, "cached_asset_path_or_download", no_download)
    step = LocalLanguageFilter(path, ["en"], 0.65)
    assert isinstance(step.model, LocalFT176LID)
    en = Document(text="The weather is lovely today, so we are going for a walk in the park.",
                  id="en")
    de = Document(text="Das Wetter ist heute schön, also gehen wir im Park spazieren.", id="de")
    assert step.filter(en) is True and step.filter(de) is False
    assert (en.metadata["language"], de.metadata["language"]) == ("en", "de")
    assert step.seen == {"en": 1, "de": 1}


def test_fasttext_private_loader_loads_and_predicts(home: Path) -> None:
    from fasttext.FastText import _FastText

    from tasks.assets import ensure_lid_model
    from tasks.ingest import _load_fasttext
    from tasks.quality import _load

    path = str(ensure_lid_model(home))
    for model in (_load_fasttext(path), _load(path, 0)):
        assert isinstance(model, _FastText)
        labels, probs = model.predict(["This sentence is written in plain English."], k=1)
        assert labels[0][0] == "__label__en" and 0.5 < probs[0][0] <= 1.0


def test_prefect_reads_the_offline_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import Settings

    from flows.env import OFFLINE_ENV

    names = sorted(k for k in OFFLINE_ENV if k.startswith("PREFECT_"))
    assert names == ["PREFECT_SERVER_ANALYTICS_ENABLED",
                     "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]
    # Values other than the defaults, so a name Prefect no longer reads cannot pass.
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "177")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    settings = Settings()
    assert settings.server.ephemeral.startup_timeout_seconds == 177
    assert settings.server.analytics_enabled is False
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    assert Settings().server.analytics_enabled is True


def test_tldextract_fetches_no_suffix_list(monkeypatch: pytest.MonkeyPatch) -> None:
    import tldextract

    from flows.env import OFFLINE_ENV

    key = "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS"
    monkeypatch.setenv(key, OFFLINE_ENV[key])
    offline = tldextract.TLDExtract(cache_dir=None)
    assert offline.suffix_list_urls == ()
    assert offline("mail.example.co.uk").suffix == "co.uk"  # the bundled snapshot
    monkeypatch.delenv(key)
    assert tldextract.TLDExtract(cache_dir=None).suffix_list_urls  # the default fetches
