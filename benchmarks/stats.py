"""Pure helpers of ``mofserve bench load``: percentiles, Poisson arrivals, the fusion-mode mix, the
repeated-image choice, the per-point summaries and the streaming figures (time to first token,
inter-token latency, output and decode tokens/s). No I/O, no server; unit-tested on known data.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

MODES = ("clip", "dinov2", "additive", "interleaved")
PERCENTILES = (50, 90, 95, 99)
# The server's stages as the Ask timings carry them (ms). ``encoders_ms`` = max(clip, dinov2).
STAGES = ("preprocess_ms", "clip_ms", "dinov2_ms", "encoders_ms", "fusion_ms", "llm_ms", "total_ms")
# The LLM stage split (in-flight batching engine): llm_ms = llm_queue_ms + prefill_ms + decode_ms;
# time_to_first_token_ms is the front-end's. Servers before the streaming engine report none of them.
LLM_STAGES = ("llm_queue_ms", "prefill_ms", "decode_ms", "time_to_first_token_ms")
DEFAULT_MIX = "interleaved=0.4,additive=0.4,clip=0.2"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation between ranks (numpy's default)."""
    if len(values) == 0:
        raise ValueError("percentile: no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile: q must be within [0, 100], got {q}")
    ordered = sorted(float(v) for v in values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """n, mean, min, p50/p90/p95/p99 and max in ms; NaN figures (n = 0) when there is nothing."""
    n = len(latencies_ms)
    if n == 0:
        return {"n": 0, "mean": math.nan, "min": math.nan, **{f"p{q}": math.nan for q in PERCENTILES},
                "max": math.nan}
    return {"n": n, "mean": float(np.mean(latencies_ms)), "min": float(min(latencies_ms)),
            **{f"p{q}": percentile(latencies_ms, q) for q in PERCENTILES}, "max": float(max(latencies_ms))}


def poisson_arrivals(rate: float, *, duration: float | None = None, count: int | None = None,
                     seed: int = 0) -> list[float]:
    """Arrival times (s from the start) of a Poisson process of ``rate`` requests per second:
    exponential gaps of mean 1/rate drawn from ``seed``; all arrivals before ``duration`` and/or the
    first ``count`` of them (at least one bound is required; both: whichever comes first)."""
    if not rate > 0:
        raise ValueError(f"rate: must be positive, got {rate}")
    if duration is None and count is None:
        raise ValueError("poisson_arrivals: give a duration or a count")
    if count is not None and count < 0:
        raise ValueError(f"count: must be >= 0, got {count}")
    rng = np.random.default_rng(seed)
    out: list[float] = []
    t = 0.0
    while count is None or len(out) < count:
        t += float(rng.exponential(1.0 / rate))
        if duration is not None and t >= duration:
            break
        out.append(t)
    return out


def parse_mix(text: str | Mapping[str, float]) -> dict[str, float]:
    """``"interleaved=0.4,additive=0.4,clip=0.2"`` (or a bare ``"clip"``) -> normalised weights, in
    the order given. Weights must be >= 0 with a positive sum; modes are the four fusion modes."""
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, _, weight = part.partition("=")
            try:
                items.append((name.strip(), float(weight) if weight.strip() else 1.0))
            except ValueError:
                raise ValueError(f"mix: {part!r} is not MODE=WEIGHT") from None
    mix: dict[str, float] = {}
    for name, weight in items:
        if name not in MODES:
            raise ValueError(f"mix: unknown fusion mode {name!r}; expected some of {', '.join(MODES)}")
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"mix: weight of {name} must be a finite number >= 0, got {weight}")
        mix[name] = mix.get(name, 0.0) + weight
    total = sum(mix.values())
    if not total > 0:
        raise ValueError("mix: give at least one mode with a positive weight")
    return {name: weight / total for name, weight in mix.items() if weight > 0}


def sample_modes(mix: Mapping[str, float], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` fusion modes drawn independently with the mix's probabilities."""
    names = list(mix)
    weights = np.array([mix[m] for m in names], dtype=float)
    return [names[i] for i in rng.choice(len(names), size=n, p=weights / weights.sum())]


class ImagePicker:
    """Which image a request sends: with probability ``repeat_ratio`` (once something was sent) one
    already sent, uniformly among them (its encoder features are then cached by the server, unless
    evicted); otherwise the next image of the pool never sent before. When the pool of ``size``
    images is used up, fresh picks go round the sent ones from the oldest (and count as repeats)
    until the pool grows (``size`` may be raised between picks).

    ``pick`` returns ``(index, repeated)``; ``repeated`` is whether that image was sent before."""

    def __init__(self, size: int, repeat_ratio: float, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"ImagePicker: size must be >= 1, got {size}")
        if not 0.0 <= repeat_ratio <= 1.0:
            raise ValueError(f"repeat_ratio: must be within [0, 1], got {repeat_ratio}")
        self.size = size
        self.repeat_ratio = repeat_ratio
        self.rng = np.random.default_rng(seed)
        self.sent: list[int] = []
        self._sent_set: set[int] = set()
        self._wrap = 0

    def pick(self) -> tuple[int, bool]:
        if self.sent and self.rng.random() < self.repeat_ratio:
            index = self.sent[int(self.rng.integers(len(self.sent)))]
        elif len(self.sent) < self.size:  # fresh images are taken in order: the next is len(sent)
            index = len(self.sent)
        else:  # pool used up: the oldest sent, round robin
            index = self.sent[self._wrap % len(self.sent)]
            self._wrap += 1
        repeated = index in self._sent_set
        if not repeated:
            self._sent_set.add(index)
            self.sent.append(index)
        return index, repeated


def error_counts(codes: Iterable[str | None]) -> dict[str, int]:
    """{code: count} of the failed requests (``None`` marks a success), most frequent first."""
    return dict(Counter(c for c in codes if c is not None).most_common())


def stage_means(timings: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each server stage (ms) over the successful requests' timings; {} when none."""
    rows = [t for t in timings if t]
    if not rows:
        return {}
    means = {s: float(np.mean([r.get(s, 0.0) for r in rows])) for s in STAGES}
    means.update({s: float(np.mean([r[s] for r in rows if s in r])) for s in LLM_STAGES if any(s in r for r in rows)})
    return means


def summarise_point(records: Sequence[Mapping], elapsed_s: float) -> dict:
    """One sweep point from its timed records (``ok``, ``code``, ``ms``, ``mode``, ``repeated``,
    ``timings``): counts, throughput (successes / elapsed), latency summary of the successes,
    errors by code, the server's stage means overall and per mode, and the repeat share."""
    ok = [r for r in records if r["ok"]]
    latencies = [r["ms"] for r in ok]
    modes = sorted({r["mode"] for r in records})
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "errors_by_code": error_counts(None if r["ok"] else r["code"] for r in records),
        "elapsed_s": elapsed_s,
        "throughput_rps": len(ok) / elapsed_s if elapsed_s > 0 else math.nan,
        "latency_ms": latency_summary(latencies),
        "repeated_share": (sum(1 for r in records if r["repeated"]) / len(records)) if records else math.nan,
        "modes": {m: sum(1 for r in records if r["mode"] == m) for m in modes},
        "stages_ms": stage_means(r.get("timings") or {} for r in ok),
        "stages_ms_by_mode": {m: stage_means(r.get("timings") or {} for r in ok if r["mode"] == m) for m in modes},
        "stages_ms_by_repeat": {
            key: stage_means(r.get("timings") or {} for r in ok if r["repeated"] == flag)
            for key, flag in (("fresh", False), ("repeated", True))},
        "tokens": token_summary(ok, elapsed_s),
    }


# --------------------------------------------------------------------------------------------
# Tokens: time to first token, inter-token latency, output and decode tokens/s


def inter_token_gaps(deltas: Sequence[Sequence[float]]) -> list[float]:
    """ms per token between a stream's deltas ``[(ms since the request was sent, tokens written so
    far), ...]``: a gap over which k tokens arrived counts as k gaps of gap / k (the server holds
    back text that is not printable yet, e.g. part of a UTF-8 character, and sends it with the next)."""
    gaps: list[float] = []
    for (t0, n0), (t1, n1) in itertools.pairwise(deltas):
        k = int(n1) - int(n0)
        if k > 0:
            gaps.extend([(float(t1) - float(t0)) / k] * k)
    return gaps


def merged(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (start, end) intervals merged into disjoint, sorted ones (empty ones dropped)."""
    out: list[list[float]] = []
    for a, b in sorted((float(a), float(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by the (start, end) intervals, overlaps counted once."""
    return sum(b - a for a, b in merged(intervals))


def overlap_length(first: Iterable[tuple[float, float]], second: Iterable[tuple[float, float]]) -> float:
    """Length covered by both the union of ``first`` and the union of ``second``."""
    a, b = merged(first), merged(second)
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def decode_figures(streams: Iterable[tuple[float, float, int]],
                   prefills: Iterable[tuple[float, float]] = ()) -> dict[str, float]:
    """From each stream's decode phase ``(first token at, last token at, tokens after the first)``
    (seconds on one clock): the tokens and

    * the time at least one stream was decoding (the union of the phases) and **decode tokens/s
      with prefills** = tokens / that time: while streams decode, the engine also runs the prefills
      of requests that join (one prompt at a time, every decode step waiting for it), so this is
      what the streams together saw, at one stream 1 / its inter-token latency;
    * **decode tokens/s** = tokens / (that time minus the ``prefills``' intervals within it): the
      LLM's decode steps' own rate (with B streams in one batch up to B times one stream's);
    * the mean number of streams decoding at once (the phases' sum over their union)."""
    phases = [(float(a), float(b), int(n)) for a, b, n in streams]
    tokens = sum(n for _, _, n in phases)
    spans = [(a, b) for a, b, _ in phases]
    covered = union_length(spans)
    prefilling = overlap_length(spans, prefills)
    busy = sum(max(b - a, 0.0) for a, b, _ in phases)
    decoding = covered - prefilling
    return {"decode_tokens": tokens, "decode_s": covered, "prefill_within_decode_s": prefilling,
            "decode_tokens_per_s": tokens / decoding if decoding > 0 else math.nan,
            "decode_tokens_per_s_with_prefills": tokens / covered if covered > 0 else math.nan,
            "decode_concurrency": busy / covered if covered > 0 else math.nan}


def first_token_ms(ms: float, deltas: Sequence[Sequence[float]] | None, timings: Mapping | None) -> float | None:
    """When the client got the request's first token (ms from its start).

    The first streamed message when it carries exactly the first token. The server streams text,
    and holds a token back while its text is not printable yet (whitespace, part of a UTF-8
    character: then the first message carries several tokens, or none comes when the whole answer is
    such text); then the client's latency less what the server's front-end timed after the first
    token (``total_ms - time_to_first_token_ms``). None when neither is known (older servers)."""
    if deltas and int(deltas[0][1]) == 1:
        return float(deltas[0][0])
    timings = timings or {}
    server_ttft, total = timings.get("time_to_first_token_ms") or 0.0, timings.get("total_ms") or 0.0
    if server_ttft > 0 and total >= server_ttft:
        return max(float(ms) - (total - server_ttft), 0.0)
    return float(deltas[0][0]) if deltas else None


def token_summary(records: Sequence[Mapping], elapsed_s: float) -> dict:
    """A point's token figures from its successful records: output tokens/s (completion tokens /
    elapsed); time to first token (``ttft_ms``: ``first_token_ms``) and inter-token latency (gaps
    between streamed messages, ``inter_token_gaps``) summaries; the decode figures
    (``decode_figures``: a request's decode phase runs from its first token to its answer, on the
    phase's clock ``t_s`` + ms / 1000, with ``completion_tokens`` - 1 tokens; its prefill, the
    server's ``prefill_ms``, ends at its first token)."""
    counted = [r for r in records if r.get("completion_tokens") is not None]
    output = sum(int(r["completion_tokens"]) for r in counted)
    timed = [r for r in counted if r.get("ttft_ms") is not None]
    phases = [(r["t_s"] + r["ttft_ms"] / 1e3, r["t_s"] + r["ms"] / 1e3, max(int(r["completion_tokens"]) - 1, 0))
              for r in timed]
    prefills = [(r["t_s"] + (r["ttft_ms"] - r["timings"]["prefill_ms"]) / 1e3, r["t_s"] + r["ttft_ms"] / 1e3)
                for r in timed if (r.get("timings") or {}).get("prefill_ms")]
    streamed = [r for r in records if r.get("deltas")]
    return {"requests_counted": len(counted), "output_tokens": output,
            "output_tokens_per_s": output / elapsed_s if counted and elapsed_s > 0 else math.nan,
            "streamed": len(streamed), "ttft_ms": latency_summary([r["ttft_ms"] for r in timed]),
            "ttft_from_first_message": sum(1 for r in streamed if int(r["deltas"][0][1]) == 1),
            "itl_ms": latency_summary([g for r in streamed for g in inter_token_gaps(r["deltas"])]),
            **decode_figures(phases, prefills)}


# --------------------------------------------------------------------------------------------
# Triton's Prometheus metrics: per-model queue and compute time over one point

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
TRITON_COUNTERS = {
    "nv_inference_request_success": "requests",
    "nv_inference_exec_count": "executions",
    "nv_inference_request_duration_us": "request_us",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_compute_input_duration_us": "compute_input_us",
    "nv_inference_compute_infer_duration_us": "compute_infer_us",
    "nv_inference_compute_output_duration_us": "compute_output_us",
}
CACHE_COUNTER = "mofserve_encoder_cache_total"


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text exposition -> {(name, sorted label pairs): value}; comments skipped."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            labels, _, value = rest.rpartition("}")
            pairs = tuple(sorted(_LABEL.findall(labels)))
        else:
            name, _, value = line.partition(" ")
            pairs = ()
        try:
            out[(name.strip(), pairs)] = float(value.split()[0])
        except (ValueError, IndexError):
            continue
    return out


def triton_delta(before: Mapping, after: Mapping) -> dict[str, dict]:
    """What Triton did between two scrapes: per model, requests, executions (batches) and the mean
    ms per request of request / queue / compute (input + infer + output); plus the encoders'
    feature-cache hits and misses. Models with no request in between are left out."""
    models: dict[str, dict[str, float]] = {}
    cache: dict[str, dict[str, float]] = {}
    for key, value in after.items():
        name, labels = key
        delta = value - before.get(key, 0.0)
        label = dict(labels)
        if name in TRITON_COUNTERS and "model" in label:
            models.setdefault(label["model"], {}).setdefault(TRITON_COUNTERS[name], 0.0)
            models[label["model"]][TRITON_COUNTERS[name]] += delta
        elif name == CACHE_COUNTER and "model" in label and "result" in label:
            cache.setdefault(label["model"], {}).setdefault(label["result"], 0.0)
            cache[label["model"]][label["result"]] += delta
    out: dict[str, dict] = {}
    for model, c in sorted(models.items()):
        n = c.get("requests", 0.0)
        if n <= 0:
            continue
        compute = sum(c.get(k, 0.0) for k in ("compute_input_us", "compute_infer_us", "compute_output_us"))
        out[model] = {"requests": int(n), "executions": int(c.get("executions", 0.0)),
                      "request_ms": c.get("request_us", 0.0) / n / 1000.0,
                      "queue_ms": c.get("queue_us", 0.0) / n / 1000.0, "compute_ms": compute / n / 1000.0}
    return {"models": out, "feature_cache": {m: {k: int(v) for k, v in sorted(r.items())}
                                             for m, r in sorted(cache.items()) if any(r.values())}}
