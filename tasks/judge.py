"""LLM-as-judge for the evaluate stage: base and tuned reply to held-out prompts, and the
teacher endpoint (OpenAI-compatible ``/chat/completions``) says which reply is better.

Each pair is judged twice, with the replies swapped, so a judge that always prefers the first
(or second) position scores a tie. The API key is read from the environment variable the
teacher config names and is never written anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from data_contracts.config import ReplyJudgeConfig, TeacherConfig
from data_contracts.records import ChatSample
from tasks.stage_dir import write_atomic

log = logging.getLogger(__name__)

JUDGE_SYSTEM = (
    "You compare two assistant replies to the same conversation. A reference reply from a "
    "human agent is given for guidance. Judge helpfulness, correctness and fluency. Answer "
    "with exactly one letter: A if reply A is better, B if reply B is better, T for a tie."
)


def judge_prompt(context: list[dict[str, str]], reference: str, reply_a: str,
                 reply_b: str) -> str:
    """The judge's user message: the conversation, the reference, the two replies."""
    conv = "\n".join(f"{m['role']}: {m['content']}" for m in context)
    return (f"Conversation:\n{conv}\n\nReference reply:\n{reference}\n\n"
            f"Reply A:\n{reply_a}\n\nReply B:\n{reply_b}\n\n"
            "Which reply is better? Answer A, B or T.")


def generate_replies(model_dir: str, prompts: list[list[dict[str, str]]], tokenizer: Any,
                     max_new_tokens: int, device: str) -> list[str]:
    """Greedy replies of one model to each prompt, rendered with the tuned chat template."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False).to(device)
    model.eval()
    replies = []
    with torch.no_grad():
        for messages in prompts:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            replies.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                            skip_special_tokens=True).strip())
    del model
    return replies


def ask(teacher: TeacherConfig, prompt: str, timeout_s: float, retries: int = 2) -> str:
    """One chat completion from the endpoint; the first letter A/B/T of its answer."""
    url = teacher.base_url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": teacher.model, "temperature": 0.0, "max_tokens": 4,
                       "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                                    {"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(teacher.api_key_env, "")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                answer = json.loads(response.read())["choices"][0]["message"]["content"]
            break
        except (urllib.error.URLError, TimeoutError, KeyError, ValueError) as err:
            if attempt == retries:
                raise RuntimeError(f"judge endpoint {url} failed: {err}") from None
            time.sleep(1 + attempt)
    letter = answer.strip()[:1].upper()
    return letter if letter in ("A", "B") else "T"


def judge_models(models: dict[str, str], records: list[ChatSample], tokenizer: Any,
                 cfg: ReplyJudgeConfig, teacher: TeacherConfig, out_file: Path,
                 device: str) -> dict[str, Any]:
    """Base vs tuned replies judged by the teacher endpoint: the tuned model's win rate
    (wins + half the ties, over every judgment) with the counts; every judgment in out_file."""
    if teacher.kind != "openai" or not teacher.base_url:
        raise ValueError("evaluate.judge needs an OpenAI-compatible endpoint: set "
                         "evaluate.judge.teacher (or augment.teacher) kind=openai and base_url")
    items = []
    for rec in records:
        conv = [m.model_dump() for m in rec.conversation()]
        if len(conv) >= 2 and conv[-1]["role"] == "assistant":
            items.append((rec.id, conv[:-1], conv[-1]["content"]))
        if len(items) >= cfg.max_prompts:
            break
    prompts = [context for _, context, _ in items]
    replies = {label: generate_replies(path, prompts, tokenizer, cfg.max_new_tokens, device)
               for label, path in models.items()}
    wins = losses = ties = 0
    rows = []
    for i, (rec_id, context, reference) in enumerate(items):
        base, tuned = replies["base"][i], replies["tuned"][i]
        for tuned_first in (True, False):
            a, b = (tuned, base) if tuned_first else (base, tuned)
            verdict = ask(teacher, judge_prompt(context, reference, a, b), cfg.timeout_s)
            winner = "tie" if verdict == "T" else (
                "tuned" if (verdict == "A") == tuned_first else "base")
            wins, losses, ties = (wins + (winner == "tuned"), losses + (winner == "base"),
                                  ties + (winner == "tie"))
            rows.append({"id": rec_id, "tuned_is": "A" if tuned_first else "B",
                         "verdict": verdict, "winner": winner})
    write_atomic(out_file, "".join(json.dumps({**r, "base": replies["base"][i // 2],
                                            "tuned": replies["tuned"][i // 2]},
                                           ensure_ascii=False) + "\n"
                                for i, r in enumerate(rows)))
    total = max(len(rows), 1)
    result = {"win_rate": (wins + 0.5 * ties) / total, "wins": wins, "losses": losses,
              "ties": ties, "judgments": len(rows), "prompts": len(items),
              "judge": f"{teacher.model} at {teacher.base_url}"}
    log.info("judge: tuned win rate %.1f%% (%d wins, %d losses, %d ties)",
             100 * result["win_rate"], wins, losses, ties)
    return result
