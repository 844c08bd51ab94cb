"""Scale benchmark of the curation stages (ingest, pii, dedup): records/s and peak memory.

    .venv/bin/python benchmarks/bench_scale.py [--records 100000] [--rss-sizes 100000,1000000]
    .venv/bin/python benchmarks/bench_scale.py --records 5000 --rss-sizes 5000,50000   # quick

A seeded, realistic support-chat corpus of N JSONL records (about 900 bytes each): varied
chats built from sample_data/generate.py's topics plus slot-filled detail sentences (so that
records are not near duplicates by accident), ~12% of them with planted PII (bench_pii.py's value
generators), ~4% look-alike numbers, ~6% near duplicates and ~2% exact duplicates of recent
records, ~6% junk for the filters (other languages, tiny, keyboard mash, spam, pasted logs,
mojibake) and ~0.2% broken JSON lines. The chain ingest -> pii -> dedup runs on it, every
stage in its own subprocess (this script with --child), and so does the ceiling before each
stage: a bare read-parse-write pass over the same input (`iter_input` -> `StageWriter.keep`,
broken lines to quarantine, no stage logic).

Each child reports its import time, the stage call's time and its own peak RSS (VmHWM from
/proc: Linux carries `ru_maxrss` over fork + exec, so a child would report its parent's size).
Start-up costs inside the stage call (fastText and spaCy loading, presidio's engine) are
removed by running the whole chain on --warmup-records (1,000) too: the steady-state rate is
(records_N - records_warmup) / (seconds_N - seconds_warmup). Writes
benchmarks/results/scale.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HERE = Path(__file__).resolve().parent
STAGES = ("ingest", "pii", "dedup")
TARGET_RATIO = 1.5
ANALYSIS = "## Analysis"  # a section of scale.md written by hand, kept on reruns

# --------------------------------------------------------------------------- the corpus

PRODUCTS = ["the mobile app", "the dashboard", "my subscription", "the router", "the invoice page",
            "the CSV export", "the API", "my account settings", "the printer driver",
            "the billing page", "the desktop client", "the browser extension", "the team plan",
            "the webhook", "the order history", "the checkout", "the search page",
            "the notification settings", "the password manager", "the shipping tracker"]
DEVICES = ["iPhone 13", "Pixel 7", "Windows 11 laptop", "MacBook Air", "iPad", "Galaxy S22",
           "Chromebook", "work PC", "Ubuntu desktop", "Android tablet", "Surface Pro",
           "old ThinkPad", "Firefox on Linux", "Safari on macOS", "Edge browser"]
WHEN = ["yesterday", "this morning", "last night", "on Monday", "two days ago",
        "after the latest update", "since last week", "an hour ago", "on Friday evening",
        "right after I paid", "during the trial", "since the migration", "over the weekend",
        "at lunch today", "before the holidays"]
VERBS = ["installed", "updated", "opened", "reinstalled", "tried", "set up", "configured",
         "restarted", "reset", "synced", "connected", "renamed", "moved", "downgraded"]
SYMPTOMS = ["it froze", "nothing happened", "it showed an error", "the page went blank",
            "it logged me out", "the numbers were wrong", "it asked for a code I never got",
            "the button stayed grey", "it charged me again", "the file was empty",
            "it kept spinning", "half of the items disappeared", "the dates were shifted",
            "it said access denied", "the sync stopped", "my changes were lost"]
PEOPLE = ["my manager", "a colleague", "our accountant", "my partner", "the IT team",
          "a new hire", "our client", "the finance lead", "my assistant", "the reseller"]
ACTIONS = ["refreshed the cache on our side", "reset the sync token", "re-sent the invoice",
           "opened a ticket with engineering", "extended the trial", "restored the backup",
           "cleared the stuck payment", "unlocked the account", "re-issued the API key",
           "moved the order to priority", "fixed the tax setting", "re-linked the device"]
NEXT = ["please try again in a few minutes", "you should get an email shortly",
        "it may take up to an hour to show up", "let me know if it happens again",
        "the change applies from the next billing cycle", "you can check the status page",
        "a confirmation will appear in the app", "no further action is needed on your side"]
DETAILS = [
    "I {verb} {product} on my {device} {when} and {symptom}.",
    "{When_cap} {person} {verb} {product} from a {device}, and {symptom} for both of us.",
    "This is the {nth} time it happened, always on the {device}, and {symptom} again.",
    "Our team of {n} people relies on {product}, so {symptom} is a real problem for us.",
    "Order {order} from {when} is affected too, and {symptom} when I open it.",
    "I'm on version {version} of {product} and {person} says {symptom} there as well.",
]
REPLIES = [
    "I have {action} for {product}; {next}.",
    "Thanks for the details about the {device}. I {action2} and {next}.",
    "Order {order} is now fixed: we {action} {when2}, and {next}.",
    "Sorry about {product} on the {device}; {person} can follow the same steps, and {next}.",
]
NTH = ["second", "third", "fourth", "fifth", "sixth", "tenth"]


class ChatFactory:
    """Seeded stream of raw JSONL records (dicts, or a str for a broken line)."""

    def __init__(self, seed: int) -> None:
        import bench_pii as pii  # the PII value generators and sentence templates
        from sample_data import generate as gen

        self.rng = random.Random(seed)
        self.gen, self.pii = gen, pii
        self.recent: list[list[dict[str, str]]] = []  # a bounded pool for duplicates

    def _slots(self) -> dict[str, Any]:
        r = self.rng
        when = r.choice(WHEN)
        return {"verb": r.choice(VERBS), "product": r.choice(PRODUCTS), "device": r.choice(DEVICES),
                "when": when, "When_cap": when[0].upper() + when[1:], "when2": r.choice(WHEN),
                "symptom": r.choice(SYMPTOMS), "person": r.choice(PEOPLE), "nth": r.choice(NTH),
                "n": r.randint(2, 400), "order": f"#{r.randint(10_000, 99_999_999)}",
                "version": f"{r.randint(1, 9)}.{r.randint(0, 40)}.{r.randint(0, 20)}",
                "action": r.choice(ACTIONS), "action2": r.choice(ACTIONS), "next": r.choice(NEXT)}

    def _sentences(self, templates: list[str], k: int) -> str:
        return " ".join(t.format(**self._slots()) for t in self.rng.sample(templates, k))

    def _pii_sentence(self, i: int) -> str:
        pii, r = self.pii, self.rng
        typ = list(pii.TEMPLATES)[i % len(pii.TEMPLATES)]
        value = {
            "EMAIL_ADDRESS": lambda: f"{r.choice(pii.FIRST)}.{r.choice(pii.LAST)}@"
                                     f"{r.choice(pii.DOMAINS)}",
            "PHONE_NUMBER": lambda: pii.phone(r)[0], "CREDIT_CARD": lambda: pii.card(r)[0],
            "US_SSN": lambda: pii.ssn(r)[0], "IBAN_CODE": lambda: pii.iban(r)[0],
            "IP_ADDRESS": lambda: pii.ipv4(r)[0], "URL_CREDENTIALS": lambda: pii.url_creds(r)[0],
            "SECRET": lambda: pii.secret(r)[0],
        }[typ]()
        return r.choice(pii.TEMPLATES[typ]).format(v=value)

    def chat(self, i: int) -> list[dict[str, str]]:
        """A varied support chat: topic question + details, answer + personal follow-up."""
        gen, r = self.gen, self.rng
        topic = r.choice(gen.TOPICS)
        user = self.gen_question(topic) + " " + self._sentences(DETAILS, r.randint(2, 3))
        roll = r.random()
        if roll < 0.12:
            user += " " + self._pii_sentence(i)
        elif roll < 0.16:
            user += " " + self.pii.lookalike(r)
        answer = r.choice([topic["answer"], r.choice(topic["followups"])[1]])
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": answer + " " + self._sentences(REPLIES, 2)}]
        if r.random() < 0.2:
            msgs.insert(0, {"role": "system", "content": r.choice(gen.SYSTEM_PROMPTS)})
        if r.random() < 0.3:
            msgs += [{"role": "user", "content": r.choice(gen.THANKS) + " " +
                      self._sentences(DETAILS, 1)},
                     {"role": "assistant", "content": r.choice(gen.CLOSINGS)}]
        return msgs

    def gen_question(self, topic: dict[str, Any]) -> str:
        r, gen = self.rng, self.gen
        q = r.choice(topic["questions"])
        greeting = r.choice(gen.GREETINGS)
        return greeting + (q if greeting else q[0].upper() + q[1:]) + r.choice(gen.SIGN_OFFS)

    def junk(self) -> list[dict[str, str]]:
        """Something the ingest filters exist for (or, for mojibake, repair)."""
        gen, r = self.gen, self.rng
        kind = r.choices(["lang", "tiny", "mash", "soup", "spam", "kwspam", "log", "mojibake"],
                         weights=[30, 15, 10, 10, 8, 7, 2, 18])[0]
        if kind == "lang":
            _, q, a = r.choice(gen.NON_ENGLISH)
        elif kind == "tiny":
            q, a = r.choice(gen.TINY)
        elif kind == "mash":
            q, a = r.choice(gen.KEYBOARD_MASH), r.choice(gen.KEYBOARD_MASH)
        elif kind == "soup":
            q, a = r.choice(gen.SYMBOL_SOUP), r.choice(gen.SYMBOL_SOUP)
        elif kind == "spam":
            q, a = gen.spam_lines(r), gen.spam_lines(r)
        elif kind == "kwspam":
            q, a = r.choice(gen.KEYWORD_SPAM)
        elif kind == "log":
            q, a = "The export fails, here is the log:\n" + gen.long_log(r), "Thanks, checking."
        else:
            text, key = r.choice(gen.MOJIBAKE_SOURCES)
            q, a = gen.mojibake(text), gen.BY_KEY[key]["answer"]
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    def record(self, i: int) -> dict[str, Any] | str:
        r = self.rng
        roll = r.random()
        if roll < 0.002:
            return '{"id": "broken-%d", "messages": [{"role": "user", "content": "cut off' % i
        if roll < 0.062:
            msgs = self.junk()
        elif roll < 0.122 and self.recent:
            msgs = self.gen.near_duplicate(r, r.choice(self.recent))
        elif roll < 0.142 and self.recent:
            msgs = copy.deepcopy(r.choice(self.recent))
        else:
            msgs = self.chat(i)
            if len(self.recent) < 5000:
                self.recent.append(msgs)
            else:
                self.recent[r.randrange(5000)] = msgs
        return {"id": f"r{i:07d}", "messages": msgs}

    def records(self, n: int) -> Iterator[dict[str, Any] | str]:
        for i in range(n):
            yield self.record(i)


def write_corpus(path: Path, n: int, seed: int) -> Path:
    """Write (once: reused when it exists) the n-record corpus as JSONL."""
    if path.exists():
        return path
    part = path.with_suffix(".part")
    factory = ChatFactory(seed)
    with open(part, "w", encoding="utf-8") as fh:
        for rec in factory.records(n):
            fh.write((rec if isinstance(rec, str) else json.dumps(rec, ensure_ascii=False)) + "\n")
    part.rename(path)
    return path


# --------------------------------------------------------------------------- one stage, alone


def child(kind: str, input_path: str, output: str, overrides: list[str]) -> None:
    """Run one stage (or the bare pass) in this process; print timings and peak RSS as JSON."""
    t0 = time.perf_counter()
    from data_contracts.config import load_config

    cfg = load_config(None, overrides)
    home = Path(cfg.run.home)
    if kind == "bare":
        t1 = time.perf_counter()
        counts = bare_pass(input_path, Path(output))
    else:
        if kind == "ingest":
            from tasks.ingest import run_ingest as run
            kwargs: dict[str, Any] = {}
        elif kind == "pii":
            from tasks.pii import run_pii as run
            kwargs = {}
        else:
            from tasks.dedup import run_dedup as run
            kwargs = {"seed": cfg.run.seed}
        section = getattr(cfg, kind)
        t1 = time.perf_counter()
        m = run(input_path, Path(output), section, home=home, **kwargs)
        counts = {"records_in": m.records_in, "kept": m.kept, "filtered": m.filtered_total,
                  "deduplicated": m.deduplicated, "quarantined": m.quarantined}
    t2 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "run_s": t2 - t1, "rss_mb": peak_rss_mb(), **counts}))


def peak_rss_mb() -> float:
    """This process's own peak RSS in MiB.

    VmHWM belongs to the address space exec() created, whereas Linux carries ru_maxrss over
    fork + exec: a child of a big parent would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bare_pass(input_path: str, out: Path) -> dict[str, int]:
    """The ceiling: read, parse and write every record with no stage logic.

    common.bare_pass, plus what a raw corpus needs: its broken lines go to quarantine.
    """
    from tasks.io import Quarantined, iter_input
    from tasks.stage_dir import StageWriter

    writer = StageWriter(out, "bare")
    n = 0
    for item in iter_input(input_path):
        n += 1
        if isinstance(item, Quarantined):
            writer.quarantine(item)
        else:
            writer.keep(item)
    m = writer.finish(n, input_digests={}, config_digest="bare")
    return {"records_in": n, "kept": m.kept, "quarantined": m.quarantined}


@dataclass
class Run:
    kind: str  # bare-ingest, ingest, bare-pii, pii, bare-dedup, dedup
    size: int  # corpus size N
    records_in: int
    wall_s: float  # the whole subprocess, as the parent sees it
    import_s: float
    run_s: float  # the stage call alone
    rss_mb: float
    counts: dict[str, int]


def run_child(kind: str, label: str, size: int, input_path: Path, output: Path,
              overrides: tuple[str, ...] = ()) -> Run:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind,
           "--input", str(input_path), "--output", str(output),
           *[f"--set={o}" for o in overrides]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{label} on {input_path} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = {k: v for k, v in out.items() if k not in ("import_s", "run_s", "rss_mb")}
    run = Run(label, size, out["records_in"], wall, out["import_s"], out["run_s"], out["rss_mb"],
              counts)
    print(f"  {label:<11} N={size:>9,} in={run.records_in:>9,} wall={wall:7.1f}s "
          f"import={run.import_s:5.1f}s run={run.run_s:7.1f}s rss={run.rss_mb:7.0f} MB",
          flush=True)
    return run


def run_chain(corpus: Path, size: int, work: Path,
              dedup_executors: tuple[str, ...] = ("local",)) -> list[Run]:
    """bare + stage for ingest, pii, dedup, each stage reading the previous stage's output;
    dedup once per executor on the same input (labelled dedup, dedup[datatrove], ...)."""
    runs, source = [], corpus
    for stage in STAGES:
        bare_dir = work / f"bare-{stage}-{size}"
        runs.append(run_child("bare", f"bare-{stage}", size, source, bare_dir))
        shutil.rmtree(bare_dir, ignore_errors=True)
        out = work / f"{stage}-{size}"
        if stage == "dedup":
            for ex in dedup_executors[1:]:
                other = work / f"dedup-{ex}-{size}"
                runs.append(run_child(stage, f"dedup[{ex}]", size, source, other,
                                      (f"dedup.executor={ex}",)))
                shutil.rmtree(other, ignore_errors=True)
        runs.append(run_child(stage, stage, size, source, out,
                              (f"dedup.executor={dedup_executors[0]}",) if stage == "dedup"
                              else ()))
        if source != corpus:
            shutil.rmtree(source, ignore_errors=True)
        source = out
    shutil.rmtree(source, ignore_errors=True)
    return runs


# --------------------------------------------------------------------------- report


def steady_rate(big: Run, warm: Run | None) -> float:
    """Marginal records/s between the warm-up run and this one (start-up costs cancel)."""
    if warm is None or big.records_in <= warm.records_in or big.run_s <= warm.run_s:
        return big.records_in / big.run_s
    return (big.records_in - warm.records_in) / (big.run_s - warm.run_s)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores (shared; load average {load:.1f} at the end), "
            f"Python {platform.python_version()}")


def markdown(runs: list[Run], warm: list[Run], size: int, rss_sizes: list[int], command: str,
             started: float) -> str:
    by = {(r.kind, r.size): r for r in runs}
    wby = {r.kind: r for r in warm}
    stages = [*STAGES, *sorted({r.kind for r in runs if r.kind.startswith("dedup[")})]
    lines = [
        "# Scale of the curation stages (`benchmarks/bench_scale.py`)",
        "",
        f"Machine: {_machine()}. Date: {datetime.date.today().isoformat()}.",
        "",
        f"Command: `{command}` ({(time.perf_counter() - started) / 60:.1f} min in all).",
        "",
        "Each stage and each ceiling ran in its own subprocess. **records/s** = the stage "
        "call's steady-state rate: (records - warm-up records) / (seconds - warm-up seconds), "
        f"the warm-up being the same chain on a {warm[0].size if warm else 0:,}-record corpus, "
        "so one-off costs inside the call (fastText, spaCy and presidio loading) cancel. "
        "**seconds** = the stage call alone; interpreter start-up and imports are the "
        "**start-up s** column (not in records/s). **ceiling** = a bare read-parse-write pass "
        "(`iter_input` -> `StageWriter.keep`) over the same input, measured the same way. "
        "Peak RSS = the subprocess's own high-water mark (`VmHWM`; `ru_maxrss` would carry the "
        "parent's over fork + exec), imports included.",
        "",
        "| stage | records in | seconds | records/s | ceiling records/s | of ceiling | "
        "start-up s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in stages:
        r, bare = by.get((stage, size)), by.get((f"bare-{stage.split('[')[0]}", size))
        if r is None or bare is None:
            continue
        rate = steady_rate(r, wby.get(stage))
        ceil = steady_rate(bare, wby.get(f"bare-{stage.split('[')[0]}"))
        lines.append(f"| {stage} | {r.records_in:,} | {r.run_s:.1f} | {rate:,.0f} | {ceil:,.0f} | "
                     f"{rate / ceil:.3f} | {r.wall_s - r.run_s:.1f} | {r.rss_mb:,.0f} |")
    lines += ["", f"Outcome of the {size:,}-record chain: " + "; ".join(
        f"{s} {by[(s, size)].counts}" for s in stages if (s, size) in by) + ".", ""]
    if len(rss_sizes) >= 2:
        small, big = rss_sizes[0], rss_sizes[-1]
        lines += [
            f"## Memory: peak RSS at {big:,} vs {small:,} records (target <= {TARGET_RATIO}x)",
            "",
            "| stage | " + " | ".join(f"RSS MB at {n:,}" for n in rss_sizes) +
            " | ratio | growth per input record | target |",
            "|---|" + "---:|" * len(rss_sizes) + "---:|---:|---|",
        ]
        for kind in [f"bare-{STAGES[0]}", *stages]:
            rs = [by.get((kind, n)) for n in rss_sizes]
            if any(r is None for r in rs):
                continue
            a, b = rs[0], rs[-1]
            ratio = b.rss_mb / a.rss_mb
            per = (b.rss_mb - a.rss_mb) * 2**20 / max(1, b.records_in - a.records_in)
            verdict = "met" if ratio <= TARGET_RATIO else "**NOT met**"
            lines.append(f"| {kind} | " + " | ".join(f"{r.rss_mb:,.0f}" for r in rs) +
                         f" | {ratio:.2f}x | {per:,.0f} B | {verdict} |")
        lines.append("")
    lines += ["## All runs", "", "| run | corpus N | records in | wall s | import s | call s | "
              "peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in [*warm, *runs]:
        lines.append(f"| {r.kind} | {r.size:,} | {r.records_in:,} | {r.wall_s:.1f} | "
                     f"{r.import_s:.1f} | {r.run_s:.1f} | {r.rss_mb:,.0f} |")
    return "\n".join(lines) + "\n"


def kept_analysis(path: Path) -> str:
    """The hand-written '## Analysis' section of an earlier result file: a rerun keeps it."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(ANALYSIS)
    return "\n" + text[at:] if at >= 0 else ""


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000, help="size of the throughput table")
    ap.add_argument("--rss-sizes", default="100000,1000000",
                    help="corpus sizes for the peak-RSS ratio (largest / smallest)")
    ap.add_argument("--warmup-records", type=int, default=1000,
                    help="the chain is also run at this size; its times are subtracted")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ftflow-bench-scale"),
                    help="corpora (kept for reuse) and stage directories (removed after use)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.md")
    ap.add_argument("--json", type=Path, help="also dump every run as JSON here")
    ap.add_argument("--dedup-executors", default="local",
                    help="dedup.executor values to run dedup with, comma-separated (the first "
                         "is 'dedup' in the tables, the others 'dedup[NAME]'), e.g. "
                         "local,datatrove")
    ap.add_argument("--child", choices=["bare", *STAGES], help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.input, args.output, args.set)
        return
    started = time.perf_counter()
    rss_sizes = sorted({int(s) for s in args.rss_sizes.split(",") if s.strip()})
    sizes = sorted({args.records, *rss_sizes})
    args.workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    warm: list[Run] = []
    runs: list[Run] = []
    for n in [args.warmup_records, *sizes]:
        t0 = time.perf_counter()
        corpus = write_corpus(args.workdir / f"corpus-{n}-seed{args.seed}.jsonl", n, args.seed)
        print(f"corpus N={n:,}: {corpus} ({corpus.stat().st_size / 2**20:,.0f} MB, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
        chain = run_chain(corpus, n, args.workdir,
                          tuple(e.strip() for e in args.dedup_executors.split(",") if e.strip()))
        (warm if n == args.warmup_records else runs).extend(chain)
    argv = " ".join(sys.argv[1:])
    command = f".venv/bin/python benchmarks/bench_scale.py {argv}".strip()
    text = markdown(runs, warm, args.records, rss_sizes, command, started)
    print(text)
    args.out.write_text(text + kept_analysis(args.out))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in [*warm, *runs]], indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
