"""Does ingest keep clean technical conversations? A labelled benchmark, per filter.

    .venv/bin/python benchmarks/bench_technical.py [--clean 600] [--junk 400]

Clean rows: support-style chats whose answers are real technical text found offline - the
long descriptions (READMEs: code fences, tables, version strings, paths, shell commands) in
the venv's `*.dist-info/METADATA` files and Python's own reference documentation
(`pydoc_data.topics`: grammar rules, code) - cut into answers of 300-1,500 characters, each
behind a question naming its package or topic. Junk rows: bench_scale.py's junk generators
(other languages, tiny, keyboard mash, symbol soup, spam, keyword spam, pasted logs; mojibake
is repaired, not junk, and left out). Every row goes through ingest's filters with the default
config (the verdicts of `tasks.ingest.judge`: the first filter that drops a row names it).
Reported: share of clean rows dropped (false filtering) and of junk rows dropped (recall), per
filter and overall.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import sysconfig
import time
from collections import Counter
from email.parser import Parser
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from data_contracts.config import IngestConfig, load_config  # noqa: E402
from data_contracts.records import ChatSample, Message  # noqa: E402

QUESTIONS = ["How do I use {name}? The docs say this:", "Can you explain this part of {name}?",
             "I'm stuck with {name}, what does this mean?", "Quick question about {name}.",
             "What is the right way to do this in {name}?"]


def _chunks(text: str, rng: random.Random, lo: int = 300, hi: int = 1500) -> list[str]:
    """Consecutive paragraphs joined into answers of lo..hi characters (code blocks whole)."""
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    out, cur = [], ""
    for p in paras:
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= lo:
            if len(cur) <= hi:
                out.append(cur.strip())
            cur = ""
    return out


def readme_texts() -> list[tuple[str, str]]:
    """(package, long description) of every installed distribution that ships one."""
    site = Path(sysconfig.get_paths()["purelib"])
    found = []
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        msg = Parser().parsestr(meta.read_text(errors="replace"))
        body = msg.get_payload() or msg.get("Description") or ""
        if isinstance(body, str) and len(body) > 2000:
            found.append((msg.get("Name") or meta.parent.name, body))
    return found


def clean_rows(n: int, rng: random.Random) -> list[ChatSample]:
    import pydoc_data.topics

    sources = readme_texts() + [(f"Python's {k}", v) for k, v in
                                sorted(pydoc_data.topics.topics.items())]
    answers = [(name, c) for name, text in sources for c in _chunks(text, rng)]
    rng.shuffle(answers)
    return [ChatSample(id=f"clean-{i}", messages=[
        Message(role="user", content=rng.choice(QUESTIONS).format(name=name)),
        Message(role="assistant", content=answer)]) for i, (name, answer) in enumerate(answers[:n])]


def junk_rows(n: int, seed: int) -> list[ChatSample]:
    from bench_scale import ChatFactory

    factory, rows = ChatFactory(seed), []
    while len(rows) < n:
        msgs = factory.junk()
        if "Ã" in msgs[0]["content"] or "â€" in msgs[0]["content"]:
            continue  # mojibake: repaired, then a normal chat
        rows.append(ChatSample(id=f"junk-{len(rows)}", messages=[Message(**m) for m in msgs]))
    return rows


def verdicts(rows: list[ChatSample], cfg: IngestConfig, home: Path) -> list[str]:
    """'kept' or the filter that dropped each row (ingest's filters, in this process)."""
    from tasks.ingest import build_filters, build_steps, judge

    steps = build_steps(cfg, build_filters(cfg, home))
    out = []
    for start in range(0, len(rows), 256):
        done, _ = judge(steps, rows[start:start + 256])
        out += ["kept" if isinstance(v, ChatSample) else v[0] + (f" ({v[2]})" if v[2] else "")
                for v in done]
    return out


def table(labels: list[str], clean: int) -> str:
    c, j = Counter(labels[:clean]), Counter(labels[clean:])
    n_junk = len(labels) - clean
    reasons = sorted((set(c) | set(j)) - {"kept"})
    lines = ["| filter (first to drop) | clean rows dropped | junk rows dropped |",
             "|---|---:|---:|"]
    lines += [f"| {r} | {c[r]} ({c[r] / clean:.1%}) | {j[r]} ({j[r] / n_junk:.1%}) |"
              for r in reasons]
    lines.append(f"| **any filter** | **{clean - c['kept']} ({1 - c['kept'] / clean:.1%})** | "
                 f"**{n_junk - j['kept']} ({1 - j['kept'] / n_junk:.1%})** |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clean", type=int, default=600)
    ap.add_argument("--junk", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config override, key=value")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    clean = clean_rows(args.clean, rng)
    rows = clean + junk_rows(args.junk, args.seed)
    cfg = load_config(None, args.set)
    labels = verdicts(rows, cfg.ingest, Path(cfg.run.home))
    print(f"{len(clean)} clean technical rows, {len(rows) - len(clean)} junk rows, "
          f"{time.strftime('%Y-%m-%d')}, `{' '.join(sys.argv)}`\n")
    print(table(labels, len(clean)))
    dropped = [r for r, lab in zip(clean, labels) if lab != "kept"]
    for rec, lab in list(zip(dropped, [x for x in labels[:len(clean)] if x != "kept"]))[:5]:
        print(f"\n--- {lab}: {rec.messages[1].content[:300]!r}")


if __name__ == "__main__":
    main()
