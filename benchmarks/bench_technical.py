"""Does ingest keep clean technical conversations? A labelled benchmark, per filter.

    .venv/bin/python benchmarks/bench_technical.py [--clean 600] [--junk 400] [--split held-out]

Clean rows: support-style chats whose answers are real technical text found offline - the
long descriptions (READMEs: code fences, tables, version strings, paths, shell commands) in
the venv's `*.dist-info/METADATA` files and Python's own reference documentation
(`pydoc_data.topics`: grammar rules, code) - cut into answers of 300-1,500 characters, each
behind a question naming its package or topic. Junk rows: bench_scale.py's junk generators
(other languages, tiny, keyboard mash, symbol soup, spam, keyword spam, pasted logs; mojibake
is repaired, not junk, and left out), plus --hard-junk rows of kinds that carry technical
text or read as English (see ``hard_junk_rows``). Every row goes through ingest's filters with the
default config (the verdicts of `tasks.ingest.judge`: the first filter that drops a row names it).
Reported: share of clean rows dropped (false filtering) and of junk rows dropped (recall), per
filter and overall; each filter's junk recall when it runs alone (a filter that still catches
the same junk on its own has not been weakened by one before it); the hard junk per kind.

The ingest thresholds for chat were tuned on the clean rows of one half of the sources
(``--split tune``: packages and Python doc topics whose name's SHA-1 is even) and are reported on
the other (``--split held-out``); ``--split all`` draws from both.
"""

from __future__ import annotations

import argparse
import hashlib
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


SPLITS = {"tune": 0, "held-out": 1}


def in_split(name: str, split: str) -> bool:
    """Whether a source (package or doc topic) belongs to the split: by its name's SHA-1."""
    return split == "all" or int(hashlib.sha1(name.encode()).hexdigest(), 16) % 2 == SPLITS[split]


def sources() -> list[tuple[str, str]]:
    """(name, text) of every README and Python doc topic found offline."""
    import pydoc_data.topics

    return readme_texts() + [(f"Python's {k}", v) for k, v in
                             sorted(pydoc_data.topics.topics.items())]


def clean_rows(n: int, rng: random.Random, split: str = "all") -> list[ChatSample]:
    answers = [(name, c) for name, text in sources() for c in _chunks(text, rng)
               if in_split(name, split)]
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


CODE = re.compile(r"```[a-z]*\n.*?\n```", re.S)
BOILERPLATE = [
    "Home | Products | Pricing | Blog | About us | Contact",
    "We use cookies to improve your experience on our website. By continuing to browse, you "
    "agree to our use of cookies. Accept all cookies | Manage preferences",
    "Copyright 2026 Example Inc. All rights reserved. Privacy Policy | Terms of Service",
    "Subscribe to our newsletter to get the latest news and offers in your inbox!",
    "Follow us on Twitter, Facebook and Instagram for updates.",
]


def hard_junk_rows(n: int, seed: int) -> list[tuple[str, ChatSample]]:
    """(kind, row) of junk that carries technical text or reads as English, from
    sample_data/generate.py's pools and the READMEs of the tune split:

    - link_spam: keyword spam as markdown links and bare URLs, the kind a URL set-aside could hide;
    - tech_spam: the same spam line 12 times, an install command in backticks in each;
    - boilerplate: a web page's navigation, cookie banner and footer, repeated;
    - foreign_code: another language's support answer around a README's code block;
    - mash_code: keyboard mash around a code block;
    - word_salad: a README paragraph's words shuffled (garbled or machine-mangled text).
    """
    from sample_data import generate as gen

    rng = random.Random(seed)
    paras = [p for name, text in sources() if in_split(name, "tune")
             for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 40 and "`" not in p]
    codes = [m.group() for name, text in sources() if in_split(name, "tune")
             for m in CODE.finditer(text) if 80 < len(m.group()) < 800]
    kinds = ["link_spam", "tech_spam", "boilerplate", "foreign_code", "mash_code", "word_salad"]
    rows = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        spam = " ".join(rng.choice(gen.KEYWORD_SPAM)).split()
        if kind == "link_spam":
            words = rng.sample(spam, 8)
            q = " ".join(f"[{w}](https://{rng.choice(spam)}.example.com/{w}?ref={i})" for w in words)
            a = " ".join(f"{w} https://shop{k}.example.net/{w}" for k, w in enumerate(words))
        elif kind == "tech_spam":
            line = (f"Get {rng.choice(spam)} now, run `pip install free-{rng.choice(spam)}` "
                    f"and visit https://deals.example.com/{i}")
            q, a = "\n".join([line] * 12), "\n".join([line] * 12)
        elif kind == "boilerplate":
            q = "\n".join(rng.sample(BOILERPLATE, 3))
            a = "\n\n".join([q] * 3)
        elif kind == "foreign_code":
            _, q, a = rng.choice(gen.NON_ENGLISH)
            a = f"{a}\n\n{rng.choice(codes)}\n\n{rng.choice(gen.NON_ENGLISH)[2]}"
        elif kind == "mash_code":
            q = " ".join(rng.sample(gen.KEYBOARD_MASH, 2))
            a = f"{rng.choice(gen.KEYBOARD_MASH)}\n\n{rng.choice(codes)}"
        else:
            words = rng.choice(paras).split()
            rng.shuffle(words)
            q, a = "Can you explain this?", " ".join(words)
        rows.append((kind, ChatSample(id=f"hard-{i}", messages=[
            Message(role="user", content=q), Message(role="assistant", content=a)])))
    return rows


def verdicts(rows: list[ChatSample], cfg: IngestConfig, home: Path,
             only: str | None = None) -> list[str]:
    """'kept' or the filter that dropped each row (ingest's filters, in this process); with
    `only`, that filter alone."""
    from tasks.ingest import REASONS, build_filters, build_steps, judge

    filters = build_filters(cfg, home)
    if only:
        filters = [f for f in filters if REASONS[type(f)] == only]
    steps = build_steps(cfg, filters)
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


def alone(rows: list[ChatSample], clean: int, cfg: IngestConfig, home: Path,
          chain: list[str]) -> str:
    """Each filter's drops when it runs alone (the others off), on all junk and on the junk
    that gets past the length bounds (min_words, max_chars: the same in every config)."""
    from tasks.ingest import REASONS, build_filters

    past = [i for i, lab in enumerate(chain[clean:], clean) if lab.split(" ")[0] not in
            ("min_words", "max_chars")]
    lines = ["| filter alone | clean rows dropped | junk rows dropped | junk past the length "
             "bounds dropped |", "|---|---:|---:|---:|"]
    for name in dict.fromkeys(REASONS[type(f)] for f in build_filters(cfg, home)):
        labels = verdicts(rows, cfg, home, only=name)
        c = sum(lab != "kept" for lab in labels[:clean])
        j = sum(lab != "kept" for lab in labels[clean:])
        p = sum(labels[i] != "kept" for i in past)
        lines.append(f"| {name} | {c} ({c / clean:.1%}) | {j} ({j / (len(rows) - clean):.1%}) "
                     f"| {p} of {len(past)} ({p / max(len(past), 1):.1%}) |")
    return "\n".join(lines)


WHOLE_TEXT = ["ingest.gopher_prose_only=false", "ingest.language_threshold=0.65",
              "ingest.language_short_threshold=null",
              "ingest.gopher_min_alpha_words_ratio=0.65", "ingest.gopher_stop_words_min_words=0",
              "ingest.repetition_dup_ngram_frac=0.15", "ingest.repetition_top_ngram_min_count=1"]


def speed(n: int, home: Path) -> None:
    """CPU seconds of ingest's judge() on n scale-corpus support chats: the previous defaults
    (whole text judged) against the current ones, twice each, after a warm-up."""
    from bench_scale import ChatFactory

    from tasks.ingest import build_filters, build_steps, judge

    rows = [ChatSample(id=r["id"], messages=[Message(**m) for m in r["messages"]])
            for r in ChatFactory(1).records(n) if isinstance(r, dict)]
    for name, sets in [("whole text", WHOLE_TEXT), ("prose", [])] * 2:
        cfg = load_config(None, sets).ingest
        steps = build_steps(cfg, build_filters(cfg, home))
        judge(steps, rows[:256])
        start = time.process_time()
        for i in range(0, len(rows), 256):
            judge(steps, rows[i:i + 256])
        cpu = time.process_time() - start
        print(f"{name}: {len(rows)} chats, {cpu:.1f} CPU s, {len(rows) / cpu:.0f} records per "
              "CPU second")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clean", type=int, default=600)
    ap.add_argument("--junk", type=int, default=400)
    ap.add_argument("--hard-junk", type=int, default=0, help="rows of hard_junk_rows' kinds")
    ap.add_argument("--split", choices=["all", *SPLITS], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config override, key=value")
    ap.add_argument("--speed", type=int, default=0,
                    help="instead: CPU time of judging this many support chats, old vs new")
    args = ap.parse_args()
    if args.speed:
        speed(args.speed, Path(load_config(None, []).run.home))
        return
    rng = random.Random(args.seed)
    clean = clean_rows(args.clean, rng, args.split)
    hard = hard_junk_rows(args.hard_junk, args.seed)
    rows = clean + junk_rows(args.junk, args.seed)
    cfg = load_config(None, args.set)
    home = Path(cfg.run.home)
    labels = verdicts(rows, cfg.ingest, home)
    print(f"{len(clean)} clean technical rows ({args.split} sources), {len(rows) - len(clean)} "
          f"junk rows, {time.strftime('%Y-%m-%d')}, `{' '.join(sys.argv)}`\n")
    print(table(labels, len(clean)))
    print()
    print(alone(rows, len(clean), cfg.ingest, home, labels))
    if hard:
        hard_labels = verdicts([r for _, r in hard], cfg.ingest, home)
        print("\n| hard junk kind | rows | caught | by |\n|---|---:|---:|---|")
        for kind in dict.fromkeys(k for k, _ in hard):
            got = [lab for (k, _), lab in zip(hard, hard_labels) if k == kind]
            by = Counter(lab.split(" ")[0] for lab in got if lab != "kept")
            print(f"| {kind} | {len(got)} | {sum(lab != 'kept' for lab in got)} | "
                  f"{', '.join(f'{r} {c}' for r, c in by.most_common())} |")
    dropped = [r for r, lab in zip(clean, labels) if lab != "kept"]
    for rec, lab in list(zip(dropped, [x for x in labels[:len(clean)] if x != "kept"]))[:5]:
        print(f"\n--- {lab}: {rec.messages[1].content[:300]!r}")


if __name__ == "__main__":
    main()
