"""The measured part of ``mofserve bench frontend``: the three ways of answering (``Bench``:
front-end over gRPC, the direct ensemble call, in-process) on a started app, and the phases that
time them (warm-up, Ask per path, Compare, a second mode on a seen image) within the time budget.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from collections.abc import Sequence

import numpy as np

from mofserve.core import tensors as T

from .frontend_analysis import PATHS, compare_ks, latencies_ms, rotated
from .pipelines import InProcessPipeline
from .workload import MAX_NEW_TOKENS, OPTIONS, QUESTION

_logger = logging.getLogger(__name__)

PAUSE_S = 0.1  # idle gap between requests: spinning runtime threads of one call don't tax the next
# Time for the timed phases, shared out as a quiet run of `small` spends it (Ask 55%, Compare 28%,
# second mode 17%; unused time rolls over). A phase starts no new round once its share is spent
# (after MIN_ROUNDS), so a contended machine gives fewer samples instead of an hour-long run.
PHASE_SHARES = {"ask": 0.55, "compare": 0.28, "second_mode": 0.17}
MIN_ROUNDS = 3


# --------------------------------------------------------------------------------------------
# The three paths


class LoopThread:
    """An asyncio loop in a daemon thread: the front-end runs there, as in ``mofserve serve``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-frontend-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _client_stages(timings) -> dict[str, float]:
    return {"preprocess_ms": timings.preprocess_ms, "clip_ms": timings.clip_ms, "dinov2_ms": timings.dinov2_ms,
            "fusion_ms": timings.fusion_ms, "llm_ms": timings.llm_ms, "encoders_ms": timings.encoders_ms,
            "total_ms": timings.total_ms}


class Bench:
    """The three paths on one started app; every call takes a fresh image and returns a record."""

    def __init__(self, profile, built, endpoints, images: Sequence[bytes]) -> None:
        # lazy: tritonclient pulls grpc, needed only once a Triton runs
        import tritonclient.grpc as tritongrpc

        # lazy: grpc and the generated stubs, needed only by the gRPC client
        from mofserve.clients import MofServeClient

        self.profile = profile
        self.client = MofServeClient(endpoints.grpc, timeout=600)
        self.triton = tritongrpc.InferenceServerClient(endpoints.triton_grpc)
        self.tritongrpc = tritongrpc
        self.images = list(images)
        self.used = 0
        self.inprocess = InProcessPipeline(built)
        self._outputs: dict[str, list[str]] = {}

    def close(self) -> None:
        self.client.close()
        self.triton.close()
        self.inprocess.close()

    def fresh(self) -> tuple[int, bytes]:
        if self.used >= len(self.images):
            raise RuntimeError(f"bench frontend: ran out of the {len(self.images)} prepared images")
        self.used += 1
        return self.used - 1, self.images[self.used - 1]

    def frontend(self, image: bytes, mode: str) -> dict:
        started = time.perf_counter()
        r = self.client.ask(image, QUESTION, OPTIONS, mode=mode, max_new_tokens=MAX_NEW_TOKENS)
        ms = (time.perf_counter() - started) * 1e3
        return {"path": "frontend", "mode": mode, "ms": ms, "stages": _client_stages(r.timings),
                "answer": r.answer, "chosen": r.chosen_option}

    def compare(self, image: bytes, modes: Sequence[str]) -> dict:
        started = time.perf_counter()
        answers = self.client.compare(image, QUESTION, OPTIONS, modes=list(modes), max_new_tokens=MAX_NEW_TOKENS)
        ms = (time.perf_counter() - started) * 1e3
        return {"ms": ms, "answers": [{"mode": a.mode, "stages": _client_stages(a.timings), "answer": a.answer,
                                       "chosen": a.chosen_option} for a in answers]}

    def _vqa_outputs(self, model: str) -> list[str]:
        if model not in self._outputs:
            available = {o.name for o in self.triton.get_model_metadata(model).outputs}
            wanted = [T.ANSWER, T.CHOSEN_OPTION, T.OPTION_SCORES, T.TIMING_PREPROCESS, T.TIMING_CLIP,
                      T.TIMING_DINOV2, T.TIMING_FUSION, T.TIMING_LLM]
            self._outputs[model] = [n for n in wanted if n in available]
        return self._outputs[model]

    def direct(self, image: bytes, mode: str) -> dict:
        """The ``vqa_<mode>`` ensemble with the tensors ``TritonEngine.ask`` sends (no ALPHA: the
        profile's default, as the front-end without one)."""
        g = self.tritongrpc
        model = T.vqa_model(mode)
        names = self._vqa_outputs(model)
        started = time.perf_counter()
        inputs = []
        for name, value in ((T.IMAGE, image), (T.QUESTION, QUESTION.encode()), (T.OPTIONS, OPTIONS.encode())):
            tensor = g.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[value]], dtype=object))
            inputs.append(tensor)
        tokens = g.InferInput(T.MAX_NEW_TOKENS, [1, 1], "INT32")
        tokens.set_data_from_numpy(np.array([[MAX_NEW_TOKENS]], dtype=np.int32))
        inputs.append(tokens)
        result = self.triton.infer(model, inputs, outputs=[g.InferRequestedOutput(n) for n in names])
        ms = (time.perf_counter() - started) * 1e3

        def scalar(name: str) -> float:
            array = result.as_numpy(name)
            return 0.0 if array is None else float(np.asarray(array).reshape(-1)[0])

        stages = {"preprocess_ms": scalar(T.TIMING_PREPROCESS), "clip_ms": scalar(T.TIMING_CLIP),
                  "dinov2_ms": scalar(T.TIMING_DINOV2), "fusion_ms": scalar(T.TIMING_FUSION),
                  "llm_ms": scalar(T.TIMING_LLM)}
        stages["encoders_ms"] = max(stages["clip_ms"], stages["dinov2_ms"])

        def text(name: str) -> str:
            value = np.asarray(result.as_numpy(name)).reshape(-1)[0]
            return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

        return {"path": "direct", "mode": mode, "ms": ms, "stages": stages, "answer": text(T.ANSWER),
                "chosen": text(T.CHOSEN_OPTION)}

    def in_process(self, image: bytes, mode: str) -> dict:
        started = time.perf_counter()
        answer, stages = self.inprocess.answer(image, mode)
        ms = (time.perf_counter() - started) * 1e3
        return {"path": "inprocess", "mode": mode, "ms": ms, "stages": stages, "answer": answer.text,
                "chosen": answer.chosen_option}

    def call(self, path: str, image: bytes, mode: str) -> dict:
        return {"frontend": self.frontend, "direct": self.direct, "inprocess": self.in_process}[path](image, mode)


# --------------------------------------------------------------------------------------------
# Phases


def warm_up(bench: Bench, modes: Sequence[str]) -> dict[str, dict]:
    """One untimed request per mode and path, all three on the same image (the direct and
    in-process answers can then be checked against the front-end's)."""
    agreement = {}
    for mode in modes:
        _, image = bench.fresh()
        got = {p: bench.call(p, image, mode) for p in PATHS}
        time.sleep(PAUSE_S)
        chosen = {p: r["chosen"] for p, r in got.items()}
        answers = {p: r["answer"] for p, r in got.items()}
        agreement[mode] = {"chosen": chosen, "answers": answers,
                           "agree": len(set(chosen.values())) == 1 and len(set(answers.values())) == 1}
        _logger.info(f"warm-up {mode}: " + ", ".join(f"{p} {r['ms']:.0f} ms ({r['chosen']})" for p, r in got.items()))
    return agreement


def run_paths(bench: Bench, modes: Sequence[str], requests: int, deadline: float | None = None) -> list[dict]:
    """``requests`` rounds (fewer if ``deadline`` passes); in each, every mode once on every path,
    each on a fresh image, the order of paths (and of modes) rotating from round to round."""
    records = []
    for r in range(requests):
        if out_of_time(deadline, r):
            _logger.info(f"Ask phase: time budget spent after {r} of {requests} rounds")
            break
        started = time.perf_counter()
        for j, mode in enumerate(rotated(modes, r)):
            for path in rotated(PATHS, r + j):
                index, image = bench.fresh()
                rec = bench.call(path, image, mode)
                records.append({"phase": "ask", "round": r, "image": index, **rec})
                time.sleep(PAUSE_S)
        medians = ", ".join(f"{p} {statistics.median(latencies_ms(records, path=p, round=r)):.0f}" for p in PATHS)
        _logger.info(f"round {r + 1}/{requests} in {time.perf_counter() - started:.1f} s: {medians} ms "
                     "(median over modes)")
    return records


def run_compare(bench: Bench, modes: Sequence[str], rounds: int, deadline: float | None = None) -> list[dict]:
    """Each round: one cold Ask of the first mode and one Compare per k, each on a fresh image."""
    items: list[tuple[str, int]] = [("ask", 1), *(("compare", k) for k in compare_ks(modes))]
    records = []
    for r in range(rounds):
        if out_of_time(deadline, r):
            _logger.info(f"Compare phase: time budget spent after {r} of {rounds} rounds")
            break
        for kind, k in rotated(items, r):
            index, image = bench.fresh()
            if kind == "ask":
                rec = bench.frontend(image, modes[0])
                records.append({"phase": "compare", "kind": "ask", "k": 1, "round": r, "image": index, **rec})
            else:
                rec = bench.compare(image, modes[:k])
                records.append({"phase": "compare", "kind": "compare", "k": k, "round": r, "image": index, **rec})
            time.sleep(PAUSE_S)
        _logger.info(f"compare round {r + 1}/{rounds}: " + ", ".join(
                     f"{'ask' if x['kind'] == 'ask' else 'k=' + str(x['k'])} {x['ms']:.0f}" for x in records
                     if x["round"] == r) + " ms")
    return records


def run_second_mode(bench: Bench, pairs: Sequence[tuple[str, str]], rounds: int,
                    deadline: float | None = None) -> list[dict]:
    """Each round, for one (A, B) pair (cycling): Ask A on a fresh image X then, at once, Ask B on X
    (seen); and a cold Ask of B on another fresh image; which of the two goes first alternates."""
    records = []
    for r in range(rounds):
        if out_of_time(deadline, r, max(MIN_ROUNDS, len(pairs))):
            _logger.info(f"second-mode phase: time budget spent after {r} of {rounds} rounds")
            break
        a, b = pairs[r % len(pairs)]
        label = f"{a} -> {b}"
        for step in rotated(["pair", "cold"], r // len(pairs)):
            if step == "pair":
                index, image = bench.fresh()
                first = bench.frontend(image, a)
                second = bench.frontend(image, b)
                records.append({"phase": "second", "kind": "cold_a", "pair": label, "round": r, "image": index,
                                **first})
                records.append({"phase": "second", "kind": "seen_b", "pair": label, "round": r, "image": index,
                                **second})
            else:
                index, image = bench.fresh()
                rec = bench.frontend(image, b)
                records.append({"phase": "second", "kind": "cold_b", "pair": label, "round": r, "image": index,
                                **rec})
            time.sleep(PAUSE_S)
        _logger.info(f"second-mode round {r + 1}/{rounds} ({label}): " + ", ".join(
                     f"{x['kind']} {x['ms']:.0f}" for x in records if x["round"] == r) + " ms")
    return records


# --------------------------------------------------------------------------------------------
# Time budget


def out_of_time(deadline: float | None, rounds_done: int, min_rounds: int = MIN_ROUNDS) -> bool:
    """Whether a phase should start no further round: its deadline (time.monotonic) has passed and
    it has at least ``min_rounds``."""
    return deadline is not None and rounds_done >= min_rounds and time.monotonic() > deadline


def phase_deadline(phase: str, now: float, end: float | None) -> float | None:
    """The deadline of ``phase`` starting ``now``: its share of what is left until ``end`` among the
    phases still to run (so the time an earlier phase did not use rolls over)."""
    if end is None:
        return None
    names = list(PHASE_SHARES)
    left = sum(PHASE_SHARES[n] for n in names[names.index(phase):])
    return now + max(end - now, 0.0) * PHASE_SHARES[phase] / left
