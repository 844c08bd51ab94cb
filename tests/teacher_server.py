"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for the augment tests and the
benchmark, answering from a deterministic responder and misbehaving on request.

Run as a script (the tests start it in a subprocess so it can be killed and restarted):

    python tests/teacher_server.py --port-file P --log L [--key K] [--flaky N] [--hang-marker S]
        [--die-after K] [--latency S]

Every request is appended to the log (one JSON line: time, the last user message, its digest,
the status answered), so a test counts on the server what the client really sent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

OPENINGS = ["Sure, here is what to do:", "Happy to help with that.", "Good question.",
            "Here is the quickest way.", "Thanks for asking about this.", "No problem at all."]
STEPS = ["open the account page", "sign in to the customer portal", "go to the help centre",
         "open the mobile app", "visit the orders section", "check the billing tab"]
ACTIONS = ["choose the option you need and confirm the change",
           "follow the short form and press save when you are done",
           "pick the right entry from the list and follow the prompts",
           "select the item, review the details and submit the request",
           "use the menu on the left and confirm with the button below"]
CLOSINGS = ["The change usually takes effect within a few minutes.",
            "You will receive an email once everything is complete.",
            "If anything looks wrong, our support team is glad to help.",
            "It only takes a moment and you can undo it later.",
            "Let us know if you need any further assistance."]
TOPICS = ["update the billing details", "change the delivery date", "close an old account",
          "download past invoices", "add a second user", "turn on two step sign in",
          "move a booking", "recover a deleted file"]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pick(seq: list[str], h: str, i: int) -> str:
    return seq[int(h[2 * i:2 * i + 2], 16) % len(seq)]


def respond(messages: list[dict[str, str]]) -> str:
    """A deterministic, fluent English answer for each kind of prompt the strategies send."""
    last = messages[-1]["content"]
    h = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    if "Rate the response" in last:  # the judge
        low = "refund" in last.lower()  # the tests' judge dislikes every answer about refunds
        return "Score: 2\nOff topic." if low else "Score: 4\nRelevant and clear."
    if "JSON object" in last:  # question-answer pairs from a document
        doc = last.split("Document:", 1)[-1].strip().split(".")[0].strip()
        return json.dumps({"question": f"What does the guide say about {_pick(TOPICS, h, 0)}?",
                           "answer": f"The guide explains it this way: {doc}."})
    if "Write only the new instruction" in last:  # paraphrase, evolve, self-instruct
        return (f"Could you explain how I can {_pick(TOPICS, h, 1)} and then "
                f"{_pick(TOPICS, h, 2)} without losing my settings?")
    return " ".join([_pick(OPENINGS, h, 0), f"First {_pick(STEPS, h, 1)}, then",
                     _pick(ACTIONS, h, 2) + ".", _pick(CLOSINGS, h, 3)])


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.served = 0
        self.inflight = 0
        self.log = open(args.log, "a", buffering=1)

    def record(self, **row: Any) -> None:
        with self.lock:
            self.log.write(json.dumps({"t": time.time(), **row}) + "\n")
            self.log.flush()


class Handler(BaseHTTPRequestHandler):
    state: State
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
              ) -> None:
        self._release()  # answered: the client may send its next request from here on
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        st = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        messages = body["messages"]
        user = messages[-1]["content"]
        key = digest(json.dumps(messages, sort_keys=True))
        with st.lock:
            attempt = st.attempts.get(key, 0)
            st.attempts[key] = attempt + 1
            st.inflight += 1
            inflight = st.inflight  # requests held and not yet answered, this one included
        self._held = True
        try:
            self._answer(body, messages, user, key, attempt, inflight)
        finally:
            self._release()

    def _release(self) -> None:
        """This request no longer counts as in flight (once, when its answer starts)."""
        if getattr(self, "_held", False):
            self._held = False
            with self.state.lock:
                self.state.inflight -= 1

    def _answer(self, body: dict[str, Any], messages: list[dict[str, str]], user: str,
                key: str, attempt: int, inflight: int) -> None:
        st, args = self.state, self.state.args
        if args.latency:
            time.sleep(args.latency)
        row = {"prompt": user, "digest": key, "attempt": attempt, "inflight": inflight}
        if self.path.rstrip("/") != "/v1/chat/completions":
            st.record(status=404, **row)
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if args.key and self.headers.get("Authorization") != f"Bearer {args.key}":
            st.record(status=401, **row)
            sent = self.headers.get("Authorization", "").removeprefix("Bearer ")
            return self._send(401, {"error": {"message": f"Incorrect API key provided: {sent}"}})
        bucket = int(key, 16) % args.flaky if args.flaky else -1
        if attempt == 0 and bucket == 0:
            st.record(status=429, **row)
            return self._send(429, {"error": {"message": "rate limited"}},
                              {"Retry-After": str(args.retry_after)})
        if attempt == 0 and bucket == 1:
            st.record(status=500, **row)
            return self._send(500, {"error": {"message": "internal error"}})
        if attempt == 0 and args.hang_marker and args.hang_marker in user:
            st.record(status=0, hung=True, **row)
            time.sleep(args.hang_s)  # the client times out long before this
            return
        reply = respond(messages)
        self._send(200, {
            "id": f"cmpl-{key}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", ""), "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                      "total_tokens": 2},
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply}}]})
        st.record(status=200, **row)
        with st.lock:
            st.served += 1
            die = args.die_after and st.served >= args.die_after
        if die:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-run, as by the OOM killer

    def log_message(self, *args: object) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a hung request


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--key", default="")
    p.add_argument("--flaky", type=int, default=0,
                   help="first attempt of 1 prompt in N: 429, of another 1 in N: 500")
    p.add_argument("--retry-after", default="1")
    p.add_argument("--hang-marker", default="")
    p.add_argument("--hang-s", type=float, default=60.0)
    p.add_argument("--die-after", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0)
    args = p.parse_args()
    Handler.state = State(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    tmp = Path(args.port_file + ".partial")
    tmp.write_text(str(server.server_port))
    os.replace(tmp, args.port_file)
    server.serve_forever()



class TeacherServer:
    """The server above in a subprocess: started, killed and restarted by a test."""

    def __init__(self, workdir: Path, *, port: int = 0, **options: Any) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / "requests.jsonl"
        self.port, self.options = port, options
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, **options: Any) -> "TeacherServer":
        import subprocess
        import sys

        opts = {**self.options, **options}
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--port", str(self.port), "--port-file", str(port_file),
               "--log", str(self.log)]
        for key, value in opts.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"teacher server did not start: {self.proc.stderr.read()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)
            self.proc.stderr.close()

    def requests(self) -> list[dict[str, Any]]:
        """Every request the server saw, across restarts."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    main()
