"""What the readiness probe asks (server/probe.py), against a fake engine that records the calls:
its own question only while no real answer has proven the llm since the last probe."""

from __future__ import annotations

import asyncio

from mofserve.server.probe import probe_inference


class RecordingEngine:
    """The calls ``probe_inference`` makes of ``TritonEngine``, recorded by model."""

    def __init__(self, dead: str | None = None) -> None:
        self.calls: list[str] = []
        self.dead = dead  # a model whose call fails
        self.client = self

    async def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.dead:
            raise TimeoutError

    async def ask(self, question, selection, timeout=None) -> None:
        await self._call(f"vqa_{selection.mode.value}")

    async def encode(self, image, selection, timeout=None) -> None:
        await self._call(f"tokens_{selection.mode.value}")

    async def ping_llm(self, timeout) -> None:
        await self._call("ping llm")

    async def is_model_ready(self, name) -> bool:
        return True

    async def embed_text(self, texts, timeout=None) -> None:
        await self._call("embed_text")


def test_an_unproven_llm_is_asked_a_question_and_pinged():
    engine = RecordingEngine()
    result = asyncio.run(probe_inference(engine, timeout=1.0))
    assert result.ok and "vqa_interleaved" in result.calls
    assert sorted(engine.calls) == sorted(["vqa_interleaved", "ping llm", "tokens_clip", "tokens_dinov2",
                                           "tokens_additive", "embed_text"])


def test_a_proven_llm_is_only_pinged_and_every_other_model_still_answers():
    engine = RecordingEngine()
    result = asyncio.run(probe_inference(engine, timeout=1.0, llm_proven=True))
    assert result.ok and "vqa_interleaved" not in engine.calls
    assert sorted(engine.calls) == sorted(["tokens_interleaved", "ping llm", "tokens_clip", "tokens_dinov2",
                                           "tokens_additive", "embed_text"])


def test_a_dead_llm_fails_the_light_probe_by_its_ping():
    result = asyncio.run(probe_inference(RecordingEngine(dead="ping llm"), timeout=1.0, llm_proven=True))
    assert not result.ok and result.reason.startswith("llm: deadline_exceeded")
