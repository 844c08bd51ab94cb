"""The generation strategies, each run as distilabel Tasks on the teacher LLM.

A strategy turns a batch of seeds into candidate rows (``Candidate``), each with its
provenance: strategy, teacher, the digest of the prompt templates it used and its seed ids.

- ``fresh_reply``: a new final reply to the seed chat (distilabel's ``ChatGeneration``).
- ``paraphrase``: the last user turn reworded (``RewriteInstruction``), then answered.
- ``evolve``: the instruction made more complex, Evol-Instruct style (one of four methods,
  chosen by the seed), then answered.
- ``self_instruct``: a new instruction from a few seed instructions of one domain
  (``SelfInstruction``), then answered.
- ``doc_qa``: a question and its answer from a plain-text record (``DocumentQA``).
- ``preference``: the teacher's reply as chosen, the base model's as rejected.

distilabel's ``Pipeline`` is not used: it runs steps in subprocesses and keeps its own batch
cache, while the stage needs per-request resume, progress and its ledger in one process. Each
Task runs through its own ``process()``, exactly what the pipeline would call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from distilabel.steps.tasks import ChatGeneration, Task

from data_contracts.records import ChatSample, Message, content_id

PARAPHRASE = (
    "Paraphrase the instruction below: keep its meaning and its language, change the wording.\n"
    "Write only the new instruction.\n\nInstruction:\n{instruction}")
EVOLVE = (
    "Rewrite the instruction below into a more complex version that a capable assistant can "
    "still answer. Method: {method}. Keep it self-contained and in the same language.\n"
    "Write only the new instruction.\n\nInstruction:\n{instruction}")
EVOLVE_METHODS = (
    "add one more constraint or requirement",
    "deepen it: also ask about the reasons and the edge cases",
    "make it concrete: replace general ideas with a specific situation",
    "require reasoning in several explicit steps")
SELF_INSTRUCT = (
    "Here are instructions users sent to an assistant, all from one domain:\n{examples}\n\n"
    "Write one new instruction of the same kind and domain, different from all of them, "
    "self-contained, in one or two sentences.\nWrite only the new instruction.")
DOC_QA = (
    "Read the document and write one question a user could ask that the document answers, and "
    "its answer, using only the document. Reply with a JSON object "
    '{{"question": "...", "answer": "..."}} and nothing else.\n\nDocument:\n{document}')
ANSWER = "(the conversation itself, answered by the teacher)"
DOC_CHARS = 4000

TEMPLATES: dict[str, tuple[str, ...]] = {
    "fresh_reply": (ANSWER,), "paraphrase": (PARAPHRASE, ANSWER),
    "evolve": (EVOLVE, *EVOLVE_METHODS, ANSWER), "self_instruct": (SELF_INSTRUCT, ANSWER),
    "doc_qa": (DOC_QA,), "preference": (ANSWER, "rejected: the base model's reply"),
}


def template_digest(strategy: str) -> str:
    """The digest of every prompt template a strategy uses: provenance of its rows."""
    return hashlib.sha256("\x00".join(TEMPLATES[strategy]).encode()).hexdigest()[:12]


class RewriteInstruction(Task):
    """A new instruction from an old one (paraphrase, evolve) through a template."""

    template: str

    @property
    def inputs(self) -> list[str]:
        return ["instruction", "method"]

    @property
    def outputs(self) -> list[str]:
        return ["new_instruction", "model_name"]

    def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
        text = self.template.format(instruction=input["instruction"], method=input["method"])
        return [{"role": "user", "content": text}]

    def format_output(self, output: str | None, input: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        return {"new_instruction": clean_instruction(output)}


class SelfInstruction(Task):
    """A new instruction of the same domain from a few seed instructions (Self-Instruct)."""

    @property
    def inputs(self) -> list[str]:
        return ["examples"]

    @property
    def outputs(self) -> list[str]:
        return ["new_instruction", "model_name"]

    def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
        examples = "\n".join(f"- {' '.join(e.split())}" for e in input["examples"])
        return [{"role": "user", "content": SELF_INSTRUCT.format(examples=examples)}]

    def format_output(self, output: str | None, input: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        return {"new_instruction": clean_instruction(output)}


class DocumentQA(Task):
    """A question a document answers, and the answer, as JSON."""

    @property
    def inputs(self) -> list[str]:
        return ["document"]

    @property
    def outputs(self) -> list[str]:
        return ["question", "answer", "parse_error", "model_name"]

    def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
        return [{"role": "user", "content": DOC_QA.format(document=input["document"][:DOC_CHARS])}]

    def format_output(self, output: str | None, input: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        text = (output or "").strip().removeprefix("```json").removeprefix("```")
        text = text.removesuffix("```").strip()
        try:
            obj = json.loads(text)
            q, a = obj["question"], obj["answer"]
            if not (isinstance(q, str) and isinstance(a, str)):
                raise TypeError("question and answer must be strings")
        except (ValueError, KeyError, TypeError) as err:
            return {"question": None, "answer": None,
                    "parse_error": f"no JSON question/answer in the reply: {err}"}
        return {"question": q.strip(), "answer": a.strip(), "parse_error": None}


class JudgeRating(Task):
    """LLM-as-judge: the teacher scores a row 1-5 on relevance, accuracy and format."""

    @property
    def inputs(self) -> list[str]:
        return ["instruction", "response"]

    @property
    def outputs(self) -> list[str]:
        return ["judgement", "model_name"]

    def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
        from tasks.augment_validate import JUDGE_RUBRIC

        text = JUDGE_RUBRIC.format(instruction=input["instruction"], response=input["response"])
        return [{"role": "user", "content": text}]

    def format_output(self, output: str | None, input: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        return {"judgement": output or ""}


def clean_instruction(text: str | None) -> str:
    """The instruction alone: no quotes or 'Instruction:' label around it."""
    out = (text or "").strip()
    for label in ("New instruction:", "Instruction:"):
        if out.lower().startswith(label.lower()):
            out = out[len(label):].strip()
    return out.strip('"“”').strip()


def run_task(task: Task, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A distilabel Task over rows, as its pipeline step would run it (one batch)."""
    if not rows:
        return []
    return next(task.process(rows))


@dataclass
class Candidate:
    """One synthetic row as generated, before validation."""

    strategy: str
    seed_ids: list[str]
    record: ChatSample | None = None  # None: the generation could not be made into a row
    problem: str | None = None  # why not (for the ledger)
    # (text, the prompt it answers) for every generated piece validate_generation checks
    texts: list[tuple[str, str, str]] = field(default_factory=list)  # (label, text, prompt)


def last_user(rec: ChatSample) -> str:
    return next(m.content for m in reversed(rec.messages) if m.role == "user")


def context(rec: ChatSample) -> list[Message]:
    """The seed's turns up to and including its last user turn."""
    msgs = list(rec.messages)
    while msgs and msgs[-1].role != "user":
        msgs.pop()
    return msgs


def _dicts(msgs: list[Message]) -> list[dict[str, str]]:
    return [m.model_dump() for m in msgs]


def chat_row(msgs: list[Message], reply: str, meta: dict[str, Any]) -> ChatSample:
    full = [*msgs, Message(role="assistant", content=reply)]
    return ChatSample(id=content_id(_dicts(full), None), messages=full, meta=meta)


class Strategies:
    """Runs each strategy on the teacher (and the base model, for rejected replies)."""

    def __init__(self, teacher: Any, provenance: Callable[[str, list[str]], dict[str, Any]],
                 rejecter: Callable[[], Any] | None = None,
                 check_instruction: Callable[[str, str], str | None] | None = None) -> None:
        self.teacher = teacher
        self.provenance = provenance
        self._rejecter = rejecter
        self._base: Task | None = None
        self.check_instruction = check_instruction or (lambda text, prompt: None)
        # Tasks run outside a distilabel Pipeline warn so once per instance: expected here.
        logging.getLogger("distilabel.step").setLevel(logging.ERROR)
        self.chat = ChatGeneration(llm=teacher)
        self.chat.load()

    def _task(self, cls: type[Task], **kw: Any) -> Task:
        task = cls(llm=self.teacher, **kw)
        task.load()
        return task

    def _answer(self, cands: list[Candidate], convs: list[list[Message]],
                instructions: list[str]) -> None:
        """Answer each candidate's new instruction (its conversation) with the teacher."""
        ok = [i for i, c in enumerate(cands) if c.problem is None]
        outs = run_task(self.chat, [{"messages": _dicts(convs[i])} for i in ok])
        for i, out in zip(ok, outs):
            c, reply = cands[i], out.get("generation") or ""
            c.texts.append(("reply", reply, instructions[i]))
            c.record = chat_row(convs[i], reply, self.provenance(c.strategy, c.seed_ids))

    def fresh_reply(self, seeds: list[ChatSample], extra: Any = None) -> list[Candidate]:
        outs = run_task(self.chat, [{"messages": _dicts(context(s))} for s in seeds])
        cands = []
        for s, out in zip(seeds, outs):
            reply = out.get("generation") or ""
            c = Candidate("fresh_reply", [s.id], texts=[("reply", reply, last_user(s))])
            c.record = chat_row(context(s), reply, self.provenance("fresh_reply", [s.id]))
            cands.append(c)
        return cands

    def _rewritten(self, name: str, seeds: list[ChatSample], new: list[str]) -> list[Candidate]:
        cands, convs = [], []
        for s, text in zip(seeds, new):
            c = Candidate(name, [s.id], texts=[("instruction", text, last_user(s))])
            if (why := self.check_instruction(text, last_user(s))) is not None:
                c.problem = f"instruction: {why}"
            cands.append(c)
            convs.append([*context(s)[:-1], Message(role="user", content=text)])
        self._answer(cands, convs, new)
        return cands

    def paraphrase(self, seeds: list[ChatSample], extra: Any = None) -> list[Candidate]:
        task = self._task(RewriteInstruction, template=PARAPHRASE)
        outs = run_task(task, [{"instruction": last_user(s), "method": ""} for s in seeds])
        return self._rewritten("paraphrase", seeds, [o["new_instruction"] for o in outs])

    def evolve(self, seeds: list[ChatSample], extra: Any = None) -> list[Candidate]:
        task = self._task(RewriteInstruction, template=EVOLVE)
        rows = [{"instruction": last_user(s), "method": EVOLVE_METHODS[
            int(hashlib.sha256(s.id.encode()).hexdigest(), 16) % len(EVOLVE_METHODS)]}
            for s in seeds]
        outs = run_task(task, rows)
        return self._rewritten("evolve", seeds, [o["new_instruction"] for o in outs])

    def self_instruct(self, seeds: list[ChatSample], extra: Any = None) -> list[Candidate]:
        """extra: for each seed, the other seeds of its domain shown beside it."""
        task = self._task(SelfInstruction)
        groups = [[s, *others] for s, others in zip(seeds, extra)]
        outs = run_task(task, [{"examples": [last_user(g) for g in grp]} for grp in groups])
        cands, convs, new = [], [], []
        for grp, out in zip(groups, outs):
            text = out["new_instruction"]
            ids = [g.id for g in grp]
            c = Candidate("self_instruct", ids, texts=[("instruction", text, last_user(grp[0]))])
            if (why := self.check_instruction(text, last_user(grp[0]))) is not None:
                c.problem = f"instruction: {why}"
            cands.append(c)
            convs.append([Message(role="user", content=text)])
            new.append(text)
        self._answer(cands, convs, new)
        return cands

    def doc_qa(self, seeds: list[ChatSample], extra: Any = None) -> list[Candidate]:
        outs = run_task(self._task(DocumentQA), [{"document": s.text or ""} for s in seeds])
        cands = []
        for s, out in zip(seeds, outs):
            c = Candidate("doc_qa", [s.id])
            if out["parse_error"]:
                c.problem = out["parse_error"]
            else:
                q, a = out["question"], out["answer"]
                c.texts = [("question", q, ""), ("reply", a, q)]
                c.record = chat_row([Message(role="user", content=q)], a,
                                    self.provenance("doc_qa", [s.id]))
            cands.append(c)
        return cands

    def preference(self, seeds: list[ChatSample], extra: Any = None) -> list[Candidate]:
        rows = [{"messages": _dicts(context(s))} for s in seeds]
        chosen = run_task(self.chat, rows)
        if self._base is None:  # the base model, loaded once for every batch
            self._base = ChatGeneration(llm=self._rejecter() if self._rejecter else self.teacher)
            self._base.load()
        rejected = run_task(self._base, rows)
        cands = []
        for s, c_out, r_out in zip(seeds, chosen, rejected):
            good, bad = c_out.get("generation") or "", r_out.get("generation") or ""
            c = Candidate("preference", [s.id], texts=[("chosen", good, last_user(s))])
            msgs = context(s)
            pair = (good, bad)
            try:
                c.record = ChatSample(id=content_id(_dicts(msgs), None, pair), messages=msgs,
                                      chosen=good, rejected=bad,
                                      meta=self.provenance("preference", [s.id]))
            except ValueError as err:  # an empty reply: no pair
                c.problem = f"not a preference pair: {' '.join(str(err).split())[:200]}"
            cands.append(c)
        return cands

    def judge(self, rows: list[ChatSample]) -> list[str]:
        """The judge's answer for each row (its last user turn and its reply)."""
        task = self._task(JudgeRating)
        inputs = [{"instruction": last_user(r),
                   "response": r.chosen if r.chosen is not None else r.messages[-1].content}
                  for r in rows]
        return [o["judgement"] for o in run_task(task, inputs)]
