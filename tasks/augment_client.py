"""The teacher's HTTP side: an OpenAI chat-completions client that survives a flaky endpoint,
and a per-request cache in the ftflow home so a run that dies mid-generation resumes.

- **Retries** on timeouts, dropped connections, 408/409/429 and 5xx: exponential backoff with
  jitter, and at least the server's ``Retry-After``. Anything else (400, 401, 403, 404, ...) is a
  mistake a retry cannot fix: the stage fails at once.
- **A hung request** is cut off by the socket timeout (``timeout_s``) and retried.
- **Concurrency**: ``complete_many`` keeps up to ``concurrency`` requests in flight (threads).
- **Cache**: one file per request under ``<home>/cache/teacher/``, keyed by
  (teacher, model, messages, params) and written atomically; a hit is never sent again.
- **Failure** after the retries is one ``TeacherError`` line naming the endpoint. The API key
  lives in memory only: never in the cache key, a message or a log line.

distilabel's own ``OpenAILLM`` (the openai SDK) retries but keeps no per-request cache and
counts nothing, so the HTTP call is ours; distilabel still runs each strategy as a Task.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

from data_contracts.config import FinalError

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx
MAX_RETRY_AFTER_S = 600.0
Messages = list[dict[str, str]]


class TeacherError(RuntimeError, FinalError):
    """The teacher could not answer after its retries (or was refused outright)."""


class TeacherStats:
    """Requests, retries and cache hits of a stage, by reason; safe to update from threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def metrics(self, prefix: str = "augment.teacher.") -> dict[str, float]:
        with self._lock:
            return {prefix + k: float(v) for k, v in sorted(self.counts.items())}


class RequestCache:
    """One JSON file per request under ``root``; ``None`` as root disables it."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    @staticmethod
    def key(teacher: str, model: str, messages: Messages, params: dict[str, Any]) -> str:
        blob = json.dumps({"teacher": teacher, "model": model, "messages": messages,
                           "params": params}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        if self.root is None:
            return None
        try:
            return json.loads(self._path(key).read_text())["text"]
        except (FileNotFoundError, ValueError, KeyError):
            return None  # absent, or a file from another version: ask again

    def put(self, key: str, text: str) -> None:
        if self.root is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        tmp.write_text(json.dumps({"text": text}, ensure_ascii=False))
        os.replace(tmp, path)  # a reader sees no file or the whole answer


def cache_root(home: str | Path, enabled: bool = True) -> Path | None:
    """Where the teacher's answers are kept: <home>/cache/teacher (None when disabled)."""
    return Path(home) / "cache" / "teacher" if enabled else None


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Retryable(Exception):
    def __init__(self, reason: str, wait_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.wait_s = reason, wait_s


class ChatClient:
    """Chat completions from one OpenAI-compatible endpoint, cached, retried, concurrent."""

    def __init__(self, base_url: str, model: str, api_key: str, params: dict[str, Any], *,
                 cache: RequestCache, stats: TeacherStats, timeout_s: float = 60.0,
                 max_retries: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 concurrency: int = 4, key_source: str = "") -> None:
        self.base_url = (base_url or "https://api.openai.com/v1").rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model, self.params = model, dict(params)
        self._key = api_key
        self.cache, self.stats = cache, stats
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.concurrency = concurrency
        self.key_source = key_source  # "$OPENAI_API_KEY": named in errors, never the value

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, messages: Messages) -> str:
        body = json.dumps({"model": self.model, "messages": messages, **self.params}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self._key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as err:
            status = err.code
            detail = self._redact(err.read(300).decode("utf-8", "replace")).strip()
            if status in RETRY_STATUS or status >= 500:
                raise _Retryable(f"http_{status}", retry_after_s(err.headers.get("Retry-After")))
            if status in (401, 403):
                raise TeacherError(
                    f"teacher {self.base_url} refused the API key (HTTP {status}): check the key "
                    f"in {self.key_source or 'augment.teacher.api_key_env'}") from None
            raise TeacherError(f"teacher {self.base_url} rejected the request (HTTP {status}): "
                               f"{' '.join(detail.split())[:200]}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable("timeout") from None
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable("timeout") from None
            raise _Retryable("connection") from None
        try:
            text = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable("bad_response") from None
        return text if isinstance(text, str) else ""

    def _delay(self, attempt: int, wait_s: float | None) -> float:
        """Exponential backoff with jitter, and never less than the server's Retry-After (up to
        MAX_RETRY_AFTER_S: a server asking for an hour is treated as down)."""
        backoff = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
        return max(backoff, min(wait_s, MAX_RETRY_AFTER_S)) if wait_s else backoff

    def complete(self, messages: Messages) -> str:
        """The teacher's reply to one conversation: from the cache, else asked (with retries)."""
        key = RequestCache.key(self.base_url, self.model, messages, self.params)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.add("cache_hits")
            return cached
        last = ""
        for attempt in range(self.max_retries + 1):
            self.stats.add("requests")
            try:
                text = self._post(messages)
            except _Retryable as err:
                last = err.reason
                self.stats.add(f"failed.{err.reason}")
                if attempt == self.max_retries:
                    break
                self.stats.add("retries")
                time.sleep(self._delay(attempt, err.wait_s))
                continue
            self.cache.put(key, text)
            return text
        raise TeacherError(f"teacher {self.base_url} did not answer after {self.max_retries + 1} "
                           f"attempts (last: {last.replace('_', ' ')})")

    def complete_many(self, conversations: list[Messages],
                      on_done: Callable[[], None] | None = None) -> list[str]:
        """Replies in order, ``concurrency`` requests at a time; the first TeacherError stops
        new requests (answers already received stay cached) and is raised."""
        if self.concurrency == 1 or len(conversations) <= 1:
            out = []
            for conv in conversations:
                out.append(self.complete(conv))
                if on_done:
                    on_done()
            return out
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="teacher")
        try:
            futures = [pool.submit(self.complete, conv) for conv in conversations]
            if on_done:
                for f in futures:
                    f.add_done_callback(lambda _f: on_done())
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                raise failed.exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
