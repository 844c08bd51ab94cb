"""The teacher as a distilabel LLM: every strategy's distilabel Task asks it through here.

``TeacherLLM.generate`` answers a batch of conversations from the per-request cache first and
sends only the rest: over HTTP with ``tasks.augment_client.ChatClient`` (retries, timeouts,
concurrency) for ``kind: openai``, or to distilabel's own ``TransformersLLM`` for a local model
(the teacher, or the base model that writes a preference pair's rejected reply).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

from pydantic import PrivateAttr

with warnings.catch_warnings():  # distilabel 1.5.3 emits pydantic deprecation warnings by the 1000
    warnings.simplefilter("ignore")
    from distilabel.models.llms import LLM

from data_contracts.config import TeacherConfig
from tasks.augment_client import (ChatClient, Messages, RequestCache, TeacherError, TeacherStats,
                                  cache_root)
from tasks.base_model import resolve_base_model


class TeacherLLM(LLM):
    """A distilabel LLM over a cached batch function (conversations -> replies)."""

    label: str
    _batch: Callable[[list[Messages]], list[str]] = PrivateAttr()
    on_done: Any = None  # called once per answered conversation (progress)

    @property
    def model_name(self) -> str:
        return self.label

    def bind(self, batch: Callable[[list[Messages]], list[str]]) -> "TeacherLLM":
        self._batch = batch
        return self

    # No **kwargs: distilabel reads extra generate() parameters as required runtime parameters.
    def generate(self, inputs: list[Any], num_generations: int = 1) -> list[Any]:
        texts = self._batch([list(conv) for conv in inputs])
        return [{"generations": [t], "statistics": {"input_tokens": [0], "output_tokens": [0]}}
                for t in texts]


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def openai_teacher(cfg: TeacherConfig, home: str | Path, stats: TeacherStats) -> TeacherLLM:
    """The OpenAI-compatible teacher (the API key only ever lives in memory)."""
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise ValueError(f"augment.teacher.kind=openai reads its API key from the environment "
                         f"variable {cfg.api_key_env}, which is not set")
    client = ChatClient(
        cfg.base_url, cfg.model, key,
        {"temperature": cfg.temperature, "max_tokens": cfg.max_new_tokens},
        cache=RequestCache(cache_root(home, cfg.cache)), stats=stats, timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries, backoff_s=cfg.backoff_s, max_backoff_s=cfg.max_backoff_s,
        concurrency=cfg.concurrency, key_source=f"${cfg.api_key_env}")
    llm = TeacherLLM(label=cfg.model)
    return llm.bind(lambda convs: client.complete_many(convs, on_done=llm.on_done))


def local_model(model: str, cfg: TeacherConfig, home: str | Path, stats: TeacherStats,
                label: str) -> TeacherLLM:
    """A local transformers model through distilabel's TransformersLLM, behind the cache."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from distilabel.models.llms import TransformersLLM

    params: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens,
                              "do_sample": cfg.temperature > 0}
    if cfg.temperature > 0:
        params["temperature"] = cfg.temperature
    cache = RequestCache(cache_root(home, cfg.cache))
    inner: list[Any] = []
    llm = TeacherLLM(label=label)

    def batch(convs: list[Messages]) -> list[str]:
        keys = [RequestCache.key(f"transformers:{label}", model, c, params) for c in convs]
        out: list[str | None] = [cache.get(k) for k in keys]
        stats.add("cache_hits", sum(t is not None for t in out))
        todo = [i for i, t in enumerate(out) if t is None]
        if todo:
            if not inner:
                path = resolve_base_model(model, home)
                tl = TransformersLLM(model=path, device=_device(cfg.device),
                                     trust_remote_code=False)
                tl.load()
                inner.append(tl)
            try:
                results = inner[0].generate([convs[i] for i in todo], num_generations=1, **params)
            except Exception as err:  # a local model that cannot generate is a teacher failure
                raise TeacherError(f"local model {label} failed to generate: {err}") from err
            stats.add("requests", len(todo))
            for i, res in zip(todo, results):
                text = (res.get("generations") or [None])[0] or ""
                cache.put(keys[i], text)
                out[i] = text
                if llm.on_done:
                    llm.on_done()
        return [t or "" for t in out]

    return llm.bind(batch)


def build_teacher(cfg: TeacherConfig, home: str | Path, stats: TeacherStats) -> TeacherLLM:
    """The configured teacher as a loaded distilabel LLM."""
    llm = (openai_teacher(cfg, home, stats) if cfg.kind == "openai"
           else local_model(cfg.model, cfg, home, stats, cfg.model))
    llm.load()
    return llm


def special_tokens(cfg: TeacherConfig, home: str | Path) -> tuple[str, ...]:
    """The local teacher tokenizer's special tokens, so a leak of any of them is caught."""
    if cfg.kind != "transformers":
        return ()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_base_model(cfg.model, home))
    return tuple(t for t in tok.all_special_tokens if len(t) > 1)
