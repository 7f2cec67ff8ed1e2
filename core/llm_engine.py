"""In-flight batching for the language model: sequences join the running batch after their
prefill and leave at EOS or their token limit; every decode step serves all live sequences.

The seam (ARCHITECTURE: "visual tokens + prompt in, a stream of tokens out"): ``submit`` takes
one request's visual tokens ``[N, H]``, question, options and sampling settings and an ``emit``
callback; the engine calls ``emit`` from its own thread with a ``Delta`` per generated token
(the first also carries the option scores and the chosen option) and ends with one ``Finished``
(or ``Failed``). ``cancel`` ends a sequence early and frees its slot. The Triton model
(model_repository/llm) turns these events into decoupled responses; benchmarks and tests call
``answer`` / ``generate_many`` in process. An external engine (vLLM ``prompt_embeds``,
TensorRT-LLM's prompt table) would plug in behind the same three calls (docs/architecture.md).

One loop thread owns the model. Each turn it (1) ends cancelled sequences, (2) when no prefill
is under way and a slot is free, admits the first waiting request (FIFO), (3) runs one chunk of
the admitted request's prefill, ``prefill_chunk`` prompt positions (the whole rest while no
sequence is decoding: nobody waits on it then, and chunks cost 10-25% more on a CPU) continuing
that sequence's own KV cache (a transformers Cache, so option scores continue from it exactly as on
the one-sequence path), and (4) one batched decode step for every live sequence. When both are due
they run as one fused pass (``kv_slots.mixed_step``: the chunk's rows and the decode rows share
every GEMM, so the step costs the joiner no extra read of the weights); the first chunk is the
model's own forward. After its last chunk the request's first token is sampled and its cache copied
into its slot (core.kv_slots). Chunking bounds how long running sequences wait between tokens while
a request joins: an I-MoF prompt of the paper's shapes is ~1200 positions, ~1.8 s on 2 CPU cores at
2 of LLaMA-7B's 32 layers (~20 s at 32), during which every other stream got no token
(docs/benchmarks.md, "Chunked prefill"). ``prefill_chunk`` 0 prefills a prompt in one forward.

Bounds: ``max_sequences`` slots (``1`` serves one sequence at a time through the same code) and
a KV pool of ``kv_cache_mb`` split evenly over them (0: every slot holds the model's context). A
request whose prompt plus token limit cannot fit a slot is refused at once with
``CapacityError`` (RESOURCE_EXHAUSTED at the transports), never an out-of-memory half-way; one
that fits waits in the queue (at most ``max_waiting``, else ``CapacityError``).

Greedy answers do not depend on the batch: a row's logits differ from its one-at-a-time logits
only in float rounding (other GEMM shapes), which in fp32 does not move an argmax in the tests
(tests/unit/test_llm_engine.py); in bf16 the agreement is measured (docs/benchmarks.md).
Sampling draws from a per-request ``torch.Generator`` seeded by the request's seed, so a seeded
request gives the same tokens whoever shares its steps.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .conversation import Option, clean_answer
from .kv_slots import SlotCache, decode_step, geometry, mixed_step
from .language_model import Prompt, Sampling, VisualLanguageModel

LOGGER = logging.getLogger(__name__)


CANCEL_MEMORY = 4096  # ids cancelled before their request arrived, remembered ...
CANCEL_MEMORY_S = 300.0  # ... for this long (a request's deadline is shorter)


class CapacityError(RuntimeError):
    """The request cannot be taken now (queue full) or ever (its KV does not fit a slot);
    ``field`` names the request field at fault when one is (``max_new_tokens``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Delta:
    """New text of one sequence: one decode step's token (the text may be held back: ``""``)."""

    request_id: str
    text: str
    token_id: int
    completion_tokens: int  # tokens generated so far
    first: bool = False
    chosen_option: str = ""  # with the first delta: the options' verdict is known after prefill
    option_scores: tuple[float, ...] = ()
    queue_ms: float = 0.0
    prefill_ms: float = 0.0


@dataclass(frozen=True)
class Finished:
    request_id: str
    answer: str  # the whole answer (the deltas' text, trailing space dropped)
    finish_reason: str  # "stop" | "length" | "cancelled"
    chosen_option: str
    option_scores: tuple[float, ...]
    prompt_tokens: int  # text + visual positions the LM read
    completion_tokens: int  # tokens it wrote, EOS included
    token_ids: tuple[int, ...]
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float


@dataclass(frozen=True)
class Failed:
    request_id: str
    error: Exception


Event = Delta | Finished | Failed


@dataclass(eq=False)
class _Sequence:
    request_id: str
    prompt: Prompt
    embeds: torch.Tensor  # [1, L, H]
    options: list[Option]
    sampling: Sampling
    emit: Callable[[Event], None]
    generator: torch.Generator | None
    submitted: float = field(default_factory=time.perf_counter)
    slot: int = -1
    length: int = 0  # positions in the slot
    next_input: torch.Tensor | None = None  # [H]: the embedding the next step reads
    ids: list[int] = field(default_factory=list)
    emitted: str = ""  # text sent so far
    chosen: str = ""
    scores: tuple[float, ...] = ()
    queue_ms: float = 0.0
    prefill_ms: float = 0.0  # from its first chunk to its first token (other streams' steps included)
    prefill_started: float = 0.0
    prefilled: int = 0  # prompt positions in ``kv`` so far
    kv: object | None = None  # the model's own cache while the prefill is under way
    first_token_at: float = 0.0
    cancelled: bool = False

    @property
    def prompt_tokens(self) -> int:
        return int(self.embeds.shape[1])


class LLMEngine:
    """In-flight batching over a ``VisualLanguageModel`` (see module doc)."""

    def __init__(self, vlm: VisualLanguageModel, max_sequences: int = 8, kv_cache_mb: int = 0,
                 max_waiting: int = 256, prefill_chunk: int = 0) -> None:
        if max_sequences < 1:
            raise ValueError(f"max_sequences: must be at least 1, got {max_sequences}")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk: must be 0 (whole prompts) or a positive count, got {prefill_chunk}")
        self.vlm = vlm
        self.prefill_chunk = prefill_chunk
        self.max_waiting = max_waiting
        self.geometry = geometry(vlm.model, max_sequences, kv_cache_mb << 20)
        self.cache = SlotCache(self.geometry, vlm.device)
        eos = vlm.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # index == slot
        self._prefilling: _Sequence | None = None  # admitted, its prefill under way (its slot is reserved)
        self._by_id: dict[str, _Sequence] = {}
        # ids cancelled before they arrived (a caller that gave up while its request was still in
        # the encoders): a late submit of one of them ends at once instead of taking a slot
        self._cancelled_early: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run
        self.batched_rows = 0  # sequences served by those steps (rows / steps = mean batch)
        self.prefill_chunks = 0  # prefill forwards run (one per prompt when not chunked)
        self.fused_chunks = 0  # of those, chunks that ran fused with the running streams' decode step
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- the seam ---------------------------------------------------------------------------

    def submit(self, request_id: str, visual_tokens, question: str, options: str | None,
               sampling: Sampling, emit: Callable[[Event], None]) -> None:
        """Queue one sequence; raises ValueError (field named) or CapacityError before queueing."""
        vlm = self.vlm
        prompt, embeds, parsed = vlm.prepare(visual_tokens, question, options, sampling)
        needed = embeds.shape[1] + sampling.max_new_tokens - 1
        if needed > self.geometry.slot_tokens:
            raise CapacityError(f"max_new_tokens: the prompt ({embeds.shape[1]} tokens) and {sampling.max_new_tokens} "
                                f"new tokens need {needed} KV positions; a sequence slot holds "
                                f"{self.geometry.slot_tokens} (llm_kv_cache_mb / max_sequences)",
                                field="max_new_tokens")
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=vlm.device)
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
        sequence = _Sequence(request_id, prompt, embeds, parsed, sampling, emit, generator)
        with self._lock:
            if self._closed:
                raise CapacityError("llm: the engine is shutting down")
            if request_id in self._by_id:
                raise ValueError(f"request_id: {request_id!r} is already running")
            if self._cancelled_early.pop(request_id, None) is not None:
                sequence.cancelled = True  # the loop ends it without a prefill
            if len(self._waiting) >= self.max_waiting:
                raise CapacityError(f"llm: {len(self._waiting)} sequences are waiting for a slot (max_waiting); "
                                    "retry later")
            self._waiting.append(sequence)
            self._by_id[request_id] = sequence
            self._lock.notify()

    def cancel(self, request_id: str) -> bool:
        """End a waiting or running sequence ("cancelled"); False if it is not here (done already)."""
        with self._lock:
            sequence = self._by_id.get(request_id)
            if sequence is None:
                self._remember_cancel(request_id)
                return False
            sequence.cancelled = True
            self._lock.notify()
            return True

    def _remember_cancel(self, request_id: str) -> None:
        """Keep an unknown id for ``CANCEL_MEMORY_S`` (at most ``CANCEL_MEMORY``): its request may
        still be on its way through the encoders."""
        now = time.monotonic()
        self._cancelled_early[request_id] = now
        while self._cancelled_early and (len(self._cancelled_early) > CANCEL_MEMORY or
                                         next(iter(self._cancelled_early.values())) < now - CANCEL_MEMORY_S):
            self._cancelled_early.popitem(last=False)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work, cancel everything queued or running, stop the loop."""
        with self._lock:
            self._closed = True
            for sequence in self._by_id.values():
                sequence.cancelled = True
            self._lock.notify()
        self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting), "slots": self.geometry.slots,
                    "slot_tokens": self.geometry.slot_tokens, "steps": self.steps, "batched_rows": self.batched_rows,
                    "prefilling": int(self._prefilling is not None), "prefill_chunks": self.prefill_chunks,
                    "fused_chunks": self.fused_chunks}

    # ---- in-process conveniences (tests, benchmarks) ------------------------------------------

    def generate_many(self, requests: Sequence[dict], on_event: Callable[[Event], None] | None = None,
                      timeout: float | None = None) -> list[Finished]:
        """Submit every request at once (keys of ``submit`` but ``emit``; ``request_id`` optional),
        wait for all; the results in order. A failed request raises its error."""
        done: dict[str, Event] = {}
        finished = threading.Condition()

        def emit(event: Event) -> None:
            if on_event is not None:
                on_event(event)
            if isinstance(event, Finished | Failed):
                with finished:
                    done[event.request_id] = event
                    finished.notify_all()

        ids = []
        for i, request in enumerate(requests):
            request = dict(request)
            request_id = request.pop("request_id", None) or f"local-{id(done)}-{i}"
            ids.append(request_id)
            self.submit(request_id, emit=emit, **request)
        with finished:
            if not finished.wait_for(lambda: len(done) == len(ids), timeout):
                raise TimeoutError(f"llm: {len(ids) - len(done)} of {len(ids)} sequences unfinished after {timeout} s")
        results = [done[i] for i in ids]
        for result in results:
            if isinstance(result, Failed):
                raise result.error
        return results  # type: ignore[return-value]

    def answer(self, visual_tokens, question: str, options: str | None = None, **sampling) -> Finished:
        """One sequence, blocking (sampling keys as ``VisualLanguageModel.sampling``)."""
        return self.generate_many([dict(visual_tokens=visual_tokens, question=question, options=options,
                                        sampling=self.vlm.sampling(**sampling))])[0]

    # ---- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._closed or self._waiting or self._running or self._prefilling)
                if self._closed and not self._running and not self._waiting and self._prefilling is None:
                    return
                prefilling = [self._prefilling] if self._prefilling is not None else []
                cancelled = [s for s in (*self._waiting, *prefilling, *self._running) if s.cancelled]
                if (self._prefilling is None and self._waiting and len(self._running) < self.geometry.slots
                        and not self._waiting[0].cancelled):
                    self._prefilling = self._waiting.popleft()
            for sequence in cancelled:
                if sequence is self._prefilling:
                    self._prefilling = None  # its partial cache goes with it
                self._finish(sequence, "cancelled")
            joining = self._prefilling
            try:
                if joining is not None and joining.kv is not None and self._running:
                    self._mixed(joining)  # its next chunk and the running streams' step, one pass
                else:
                    if joining is not None:
                        self._prefill(joining)
                    if self._running:
                        self._step()
            except Exception as error:  # never let one failure stop the loop: fail those involved
                LOGGER.exception("llm: step failed")
                self._prefilling = None
                for sequence in [*self._running, *([joining] if joining is not None else [])]:
                    self._fail(sequence, error)

    def _chunk_end(self, s: _Sequence) -> int:
        """Where ``s``'s next prefill chunk ends (the first call starts its prefill's clock)."""
        if not s.prefilled:
            s.prefill_started = time.perf_counter()
            s.queue_ms = (s.prefill_started - s.submitted) * 1e3
        if not self.prefill_chunk or not self._running:  # nobody decoding: chunks would only cost (10-25%)
            return s.prompt_tokens
        return min(s.prompt_tokens, s.prefilled + self.prefill_chunk)

    def _prefill(self, s: _Sequence) -> None:
        """One chunk of ``s``'s prefill alone (the model's own forward); after the last, its first
        token and its slot."""
        end = self._chunk_end(s)
        with torch.inference_mode():
            continued = {self.vlm.cache_arg: s.kv} if s.kv is not None else {}
            out = self.vlm.model(inputs_embeds=s.embeds[:, s.prefilled:end], use_cache=True, logits_to_keep=1,
                                 **continued)
        self.prefill_chunks += 1
        s.kv, s.prefilled = getattr(out, "cache", None) or out.past_key_values, end
        if end == s.prompt_tokens:
            self._join(s, out.logits[:, -1].float())

    def _mixed(self, s: _Sequence) -> None:
        """``s``'s next chunk fused with one decode step of the running streams (kv_slots.mixed_step)."""
        running = list(self._running)
        end = self._chunk_end(s)
        logits, chunk_logits = mixed_step(self.vlm.model, self.cache, *self._decode_inputs(running),
                                          s.embeds[:, s.prefilled:end], s.kv, s.prefilled)
        self.prefill_chunks += 1
        self.fused_chunks += 1
        s.prefilled = end
        self._decoded(running, logits)
        if end == s.prompt_tokens:
            self._join(s, chunk_logits)

    def _join(self, s: _Sequence, logits: torch.Tensor) -> None:
        """``s``'s prefill is done: option scores, its first token from ``logits`` ``[1, vocab]``, its slot."""
        cache, s.kv, self._prefilling = s.kv, None, None
        with torch.inference_mode():
            if s.options:
                # scoring continues from the prompt minus its last position (VisualLanguageModel.score_options)
                scoring = copy.deepcopy(cache)
                scoring.crop(-1)  # negative: drop that many positions (4.x and 5.x)
                s.scores = tuple(self.vlm.score_options(s.embeds, s.prompt, s.options, scoring))
                s.chosen = s.options[max(range(len(s.scores)), key=s.scores.__getitem__)].letter
            token = self._sample(s, logits)
        s.length = s.prompt_tokens
        s.prefill_ms = (time.perf_counter() - s.prefill_started) * 1e3
        s.first_token_at = time.perf_counter()
        if self._advance(s, token, first=True):
            s.slot = len(self._running)
            self.cache.load(s.slot, cache)
            self._running.append(s)

    def _step(self) -> None:
        running = list(self._running)
        self._decoded(running, decode_step(self.vlm.model, self.cache, *self._decode_inputs(running)))

    def _decode_inputs(self, running: list[_Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """The running sequences' next inputs ``[B, 1, H]`` and their lengths ``[B]`` (their slots' order)."""
        embeds = torch.stack([s.next_input for s in running])[:, None, :]
        return embeds, torch.tensor([s.length for s in running], dtype=torch.long, device=self.vlm.device)

    def _decoded(self, running: list[_Sequence], logits: torch.Tensor) -> None:
        """Each running sequence's next token from its row of a decode step's ``logits``."""
        self.steps += 1
        self.batched_rows += len(running)
        greedy = logits.argmax(dim=-1).tolist()  # one device sync for every greedy row
        leaving = []
        for row, s in enumerate(running):
            s.length += 1
            token = greedy[row] if s.sampling.greedy else self._sample(s, logits[row:row + 1])
            if s.cancelled or not self._advance(s, token):
                leaving.append(s)
        for s in leaving:
            if s.cancelled:
                self._finish(s, "cancelled")
            else:
                self._release(s)

    def _sample(self, s: _Sequence, logits: torch.Tensor) -> int:
        """The next token from ``[1, vocab]`` float32 logits: argmax, or temperature + top-p
        (transformers' warpers' order and rule) drawn from the request's own generator."""
        if s.sampling.greedy:
            return int(logits.argmax(dim=-1))
        scaled = logits / s.sampling.temperature
        if s.sampling.top_p < 1.0:
            ordered, order = torch.sort(scaled, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - s.sampling.top_p)
            drop[..., -1:] = False  # keep at least one token
            scaled = scaled.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = scaled.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=s.generator))

    def _advance(self, s: _Sequence, token: int, first: bool = False) -> bool:
        """Record ``token``, stream its text; True while the sequence goes on."""
        s.ids.append(token)
        stop = token in self.stop_ids
        done = stop or len(s.ids) >= s.sampling.max_new_tokens
        text = self._text(s)
        # hold back trailing space (the answer drops it) and a partial UTF-8 character
        shown = clean_answer(text) if done else text.rstrip().removesuffix("\ufffd")
        delta = shown[len(s.emitted):] if shown.startswith(s.emitted) else ""
        s.emitted += delta
        self._send(s, Delta(s.request_id, delta, token, len(s.ids), first, s.chosen if first else "",
                            s.scores if first else (), s.queue_ms if first else 0.0,
                            s.prefill_ms if first else 0.0))
        if done:
            self._complete(s, "stop" if stop else "length")
            return False
        embed = self.vlm.model.get_input_embeddings()
        with torch.inference_mode():
            s.next_input = embed(torch.tensor([token], device=self.vlm.device))[0]
        return True

    def _text(self, s: _Sequence) -> str:
        ids = [i for i in s.ids if i not in self.stop_ids]
        return self.vlm.tokenizer.decode(ids, skip_special_tokens=True).lstrip()

    def _complete(self, s: _Sequence, reason: str) -> None:
        now = time.perf_counter()
        answer = clean_answer(self._text(s))
        with self._lock:
            self._by_id.pop(s.request_id, None)
        decode_ms = (now - s.first_token_at) * 1e3 if s.ids else 0.0
        self._send(s, Finished(s.request_id, answer, reason, s.chosen, s.scores, s.prompt_tokens, len(s.ids),
                               tuple(s.ids), s.queue_ms, s.prefill_ms, decode_ms, (now - s.submitted) * 1e3))

    def _release(self, s: _Sequence) -> None:
        """Free ``s``'s slot; the last live sequence moves into it so live slots stay ``0..B-1``."""
        if s.slot < 0:
            return
        last = self._running[-1]
        if last is not s:
            self.cache.move(last.slot, s.slot, last.length)
            last.slot = s.slot
            self._running[s.slot] = last
        self._running.pop()
        s.slot = -1

    def _finish(self, s: _Sequence, reason: str) -> None:
        with self._lock:
            if s in self._waiting:
                self._waiting.remove(s)
        self._release(s)
        if self._by_id.get(s.request_id) is s:
            self._complete(s, reason)

    def _fail(self, s: _Sequence, error: Exception) -> None:
        with self._lock:
            self._by_id.pop(s.request_id, None)
        self._release(s)
        self._send(s, Failed(s.request_id, error))

    @staticmethod
    def _send(s: _Sequence, event: Event) -> None:
        """Hand ``event`` to the request's callback; a callback that fails (its stream is gone)
        cancels that sequence only, never the step the others share."""
        try:
            s.emit(event)
        except Exception as error:
            LOGGER.warning("llm: %s: could not deliver %s (%r); cancelling it", s.request_id,
                           type(event).__name__, error)
            s.cancelled = True
