"""The optional LLM judge of MMVP, as the official ``scripts/gpt_grader.py`` asks it.

The official grader sends, per answer, a system message asking for "yes" or "no" and the user
message ``"Given the following question {prompt}, the correct answer is {correct}. Does the
following answer correctly answers the question, answer:{response}?"`` (``prompt`` is
``Question + " " + Options``, ``correct`` the CSV's Correct Answer such as ``"(a)"``) at
temperature 0.2, and counts an answer right only when the reply is exactly yes. Here the request
goes to any OpenAI-compatible chat endpoint (``--judge-url``, ``--judge-model``; the key, if the
endpoint needs one, from ``OPENAI_API_KEY``) through the ``openai`` package.

Request building and reply parsing are pure functions; ``JudgeClient`` only sends.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

JUDGE_SYSTEM = ("You are a helpful and precise assistant for checking the quality of the answer. "
                "Please answer in only yes or no.")
JUDGE_TEMPERATURE = 0.2  # the official grader's
_YES_NO = re.compile(r"^(yes|no)$", re.IGNORECASE)


def judge_question(prompt: str, correct: str, response: str) -> str:
    """The official grader's question (its wording, grammar included)."""
    return (f"Given the following question {prompt}, the correct answer is {correct}. "
            f"Does the following answer correctly answers the question, answer:{response}?")


def judge_messages(prompt: str, correct: str, response: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": judge_question(prompt, correct, response)}]


def judge_request(model: str, prompt: str, correct: str, response: str) -> dict:
    """The keyword arguments of ``chat.completions.create``."""
    return {"model": model, "messages": judge_messages(prompt, correct, response), "temperature": JUDGE_TEMPERATURE}


def parse_judge_reply(reply: str | None) -> str | None:
    """"yes" or "no" when the reply is only that word (case-insensitive; surrounding space and a
    final full stop tolerated), else None ("could not determine": graded as not correct, as the
    official grader does)."""
    text = (reply or "").strip().rstrip(".").strip()
    return text.lower() if _YES_NO.match(text) else None


def verdict_correct(verdict: str | None) -> bool:
    return verdict == "yes"


@dataclass
class JudgeClient:
    """An OpenAI-compatible chat endpoint used as the judge (needs the ``openai`` package)."""

    url: str
    model: str
    timeout: float = 120.0

    def __post_init__(self) -> None:
        try:
            import openai
        except ImportError:
            raise ValueError("--judge-url needs the openai package (pip install openai)") from None
        self._client = openai.AsyncOpenAI(base_url=self.url, api_key=os.environ.get("OPENAI_API_KEY") or "unused",
                                          timeout=self.timeout, max_retries=3)

    async def reply(self, prompt: str, correct: str, response: str) -> str:
        completion = await self._client.chat.completions.create(**judge_request(self.model, prompt, correct, response))
        if not completion.choices:
            return ""
        return completion.choices[0].message.content or ""

    async def close(self) -> None:
        await self._client.close()
