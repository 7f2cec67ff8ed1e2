"""Readiness decided by a real inference, not by Triton's word.

Triton 2.51 keeps answering ``is_server_ready`` (and ``is_model_ready``) with true while a
python-backend stub process is dead; every request to that model then fails after ~1 s with
"Stub process '<model>_0_0' is not healthy", and the backend does not start a new stub by itself
(measured here: docs/reliability.md, "Faults and recovery"). So the supervisor asks a question:
``probe_inference`` runs one cheap request through every python-backend model the service uses
and ``Readiness`` holds the verdict that ``/healthz``, gRPC health and the engine's ``ready()``
report.

The probe image is tiny and always the same, so after the first probe the encoders answer it from
their feature cache: a probe then costs a cache lookup per encoder, the four projectors and one
LLM token, yet still passes through every stub.

The ``llm`` model streams (decoupled), and when its stub dies Triton never ends the sequences it
was running, the probe's own included: so the probe also pings ``llm`` directly (a CANCEL round
trip, ``TritonEngine.ping_llm``), which a dead stub fails within a second, and which then fails
every stream in progress (the probe's question too) instead of leaving them to their deadlines.
"""

from __future__ import annotations

import asyncio
import functools
import io
import time
from dataclasses import dataclass

from mofserve.core import tensors as T
from mofserve.core.tensors import FusionMode

from .engine import EngineError, GenerationParams, Question, Selection, TritonEngine

PROBE_QUESTION = "What is in the image?"


@functools.cache
def probe_image() -> bytes:
    """A 16x16 PNG drawn here (no file, no download): small to decode, fixed so that it is cached."""
    from PIL import Image

    image = Image.new("RGB", (16, 16))
    image.putdata([(16 * x, 16 * y, 128) for y in range(16) for x in range(16)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str  # "" when ok; else which call failed and how ("llm: ..." names the step)
    elapsed_s: float
    calls: tuple[str, ...]  # what was asked: "vqa_interleaved", "tokens_clip", ...


async def probe_inference(engine: TritonEngine, timeout: float) -> ProbeResult:
    """One real request through every python-backend model, side by side, within ``timeout`` s.

    ``vqa_interleaved`` with one new token covers preprocess, both encoders, ``fuse_interleaved``
    and ``llm``; ``tokens_<mode>`` for the other three modes covers their projectors; ``embed_text``
    (when the repository serves CLIP's text tower) covers ``tokenize_text`` and ``clip_text``.
    """
    started = time.monotonic()
    image = probe_image()

    async def ask() -> None:
        question = Question(image, PROBE_QUESTION, generation=GenerationParams(max_new_tokens=1))
        # the ping names a dead llm stub quickly even if this question's sequence hangs in it
        await asyncio.gather(engine.ask(question, Selection(FusionMode.INTERLEAVED), timeout=timeout),
                             engine.ping_llm(timeout))

    async def text() -> None:
        if await asyncio.wait_for(engine.client.is_model_ready(T.EMBED_TEXT), timeout):
            await engine.embed_text([PROBE_QUESTION], timeout=timeout)

    coroutines = {T.vqa_model(FusionMode.INTERLEAVED): ask()}
    for mode in (FusionMode.CLIP, FusionMode.DINOV2, FusionMode.ADDITIVE):
        coroutines[T.tokens_model(mode)] = engine.encode(image, Selection(mode), timeout=timeout)
    coroutines[T.EMBED_TEXT] = text()
    calls = {name: asyncio.ensure_future(c) for name, c in coroutines.items()}
    await asyncio.wait(calls.values())
    failures = []
    for name, call in calls.items():
        error = call.exception()
        if error is None:
            continue
        if isinstance(error, EngineError):
            failures.append(f"{name}: {error.code}: {error.message}")
        elif isinstance(error, TimeoutError):
            failures.append(f"{name}: deadline_exceeded: no answer within {timeout:.1f} s")
        else:
            failures.append(f"{name}: {type(error).__name__}: {error}")
    return ProbeResult(not failures, "; ".join(failures), time.monotonic() - started, tuple(calls))


@dataclass
class Readiness:
    """Whether the front-end should take requests, and why not: Triton running and the last probe
    answered. The supervisor writes it; ``/healthz`` and ``TritonEngine.ready`` read it."""

    ready: bool = False
    reason: str = "starting"
    since: float = 0.0  # time.monotonic() of the last change
    last_probe: ProbeResult | None = None

    def set(self, ready: bool, reason: str = "") -> bool:
        """Record the verdict; returns whether readiness changed."""
        changed = ready != self.ready
        self.ready, self.reason = ready, "" if ready else reason
        if changed:
            self.since = time.monotonic()
        return changed
