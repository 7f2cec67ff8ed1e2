"""The pipelines the benchmarks run with no server, one request at a time (same question, image
and mode as the served ones), for same-run baselines (``bench load --baseline``, ``bench frontend``):

* ``exported`` (``InProcessPipeline``): the exported graphs Triton serves, with the profile's
  serving runtime and precision (``small``: OpenVINO bf16), the same projectors, and the LM through
  the same in-flight batching engine (``core.llm_engine.LLMEngine``, one sequence at a time) in the
  served dtype: the in-process path to the first token;
* ``eager`` (``EagerPipeline``): what a researcher would write from the paper's code: transformers'
  vision towers in eager PyTorch **fp32** (through the export wrappers that define the paper's
  features), projectors and LLaMA in fp32, ``generate``;
* ``eager-bf16`` (``EagerBf16Pipeline``): the same in bf16 as a user would write it: the towers
  under ``torch.autocast("cpu", bfloat16)``, the LLaMA loaded in bf16, ``generate``.

``answer`` returns a ``PipelineAnswer`` and the stage times in ms (``preprocess_ms``, ``clip_ms``,
``dinov2_ms``, ``encoders_ms`` = their sum (one after the other), ``fusion_ms``, ``llm_ms``; the
engine path adds ``ttft_ms`` (from the request's start to its first token), ``llm_queue_ms``,
``prefill_ms`` (prompt, option scoring, first token) and ``decode_ms`` (the other tokens)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mofserve.core import tensors as T
from mofserve.core.preprocessing import preprocess_bytes
from mofserve.core.runtime import OnnxRunner

from .workload import MAX_NEW_TOKENS, OPTIONS, QUESTION

STAGES = ("preprocess_ms", "clip_ms", "dinov2_ms", "fusion_ms", "llm_ms")
ENCODERS = {"clip": ("clip",), "dinov2": ("dinov2",), "additive": ("clip", "dinov2"),
            "interleaved": ("clip", "dinov2")}


@dataclass(frozen=True)
class PipelineAnswer:
    text: str
    chosen_option: str = ""
    completion_tokens: int = 0
    token_ids: tuple[int, ...] = ()


class InProcessPipeline:
    """The served pipeline with no server: the same exported graphs, runtime and precision as the
    cpu repository's encoders, the same projectors and the same language model behind the same
    engine (one sequence at a time: ``max_sequences`` 1)."""

    label = "exported in-process"

    def __init__(self, built) -> None:
        import torch

        from mofserve.core.checkpoints import load_fuser  # lazy: core.checkpoints imports torch

        # lazy: core.language_model imports torch and transformers
        from mofserve.core.language_model import VisualLanguageModel
        from mofserve.core.llm_engine import LLMEngine  # lazy: core.llm_engine imports torch and transformers

        profile = built.profile
        serving = profile.serving
        self.profile = profile
        self.precision = "bf16" if serving.runtime == "openvino" else "fp32"
        self.runtime = serving.runtime
        # the Triton fuse and llm models set torch's threads to these when nonzero (one process each)
        if serving.llm_threads:
            torch.set_num_threads(serving.llm_threads)
        self.encoders = {
            "clip": OnnxRunner(built.graphs[T.CLIP_VISION].graph, runtime=serving.runtime,
                               threads=serving.intra_op_threads, precision=self.precision),
            "dinov2": OnnxRunner(built.graphs[T.DINOV2_VISION].graph, runtime=serving.runtime,
                                 threads=serving.intra_op_threads, precision=self.precision),
        }
        self.fuser = load_fuser(built.checkpoints.llava)
        self.vlm = VisualLanguageModel.from_checkpoint(
            built.checkpoints.llava, dtype=serving.llm_dtype, default_max_new_tokens=serving.max_new_tokens,
            max_new_tokens_limit=serving.max_new_tokens_limit)
        self.engine = LLMEngine(self.vlm, max_sequences=1)
        self._features = {"clip": T.CLIP_FEATURES, "dinov2": T.DINO_FEATURES}
        self._input = T.PIXEL_VALUES

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def encode(self, encoder: str, pixels: np.ndarray):
        """The patch features of ``encoder`` ("clip" or "dinov2") for a [1, 3, S, S] batch, as a tensor."""
        import torch

        out = self.encoders[encoder].run({self._input: pixels})
        return torch.from_numpy(out[self._features[encoder]])

    def visual_tokens(self, image: bytes, mode: str, stages: dict[str, float]):
        """Preprocessing, the mode's encoders one after the other and the fusion, timed into ``stages``."""
        import torch

        started = time.perf_counter()
        pixels = preprocess_bytes(image, self.profile.image_size, aspect=self.profile.aspect)[None]
        stages["preprocess_ms"] = (time.perf_counter() - started) * 1e3
        features: dict[str, torch.Tensor | None] = {"clip": None, "dinov2": None}
        for encoder in ENCODERS[mode]:
            t = time.perf_counter()
            features[encoder] = self.encode(encoder, pixels)
            stages[f"{encoder}_ms"] = (time.perf_counter() - t) * 1e3
        stages["encoders_ms"] = stages["clip_ms"] + stages["dinov2_ms"]
        t = time.perf_counter()
        alpha = self.profile.default_alpha if mode == "additive" else None
        tokens = self.fuser(mode, features["clip"], features["dinov2"], alpha)
        stages["fusion_ms"] = (time.perf_counter() - t) * 1e3
        return tokens[0]

    def answer(self, image: bytes, mode: str, question: str = QUESTION, options: str = OPTIONS,
               max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[PipelineAnswer, dict[str, float]]:
        from mofserve.core.llm_engine import Delta  # lazy: core.llm_engine imports torch and transformers

        stages = dict.fromkeys(STAGES, 0.0)
        started = time.perf_counter()
        tokens = self.visual_tokens(image, mode, stages)
        first: list[float] = []

        def on_event(event) -> None:
            if isinstance(event, Delta) and not first:
                first.append(time.perf_counter())

        t = time.perf_counter()
        (done,) = self.engine.generate_many([dict(visual_tokens=tokens, question=question, options=options or None,
                                                  sampling=self.vlm.sampling(max_new_tokens=max_new_tokens))],
                                            on_event=on_event)
        stages["llm_ms"] = (time.perf_counter() - t) * 1e3
        stages.update(ttft_ms=(first[0] - started) * 1e3 if first else float("nan"), llm_queue_ms=done.queue_ms,
                      prefill_ms=done.prefill_ms, decode_ms=done.decode_ms)
        return PipelineAnswer(done.answer, done.chosen_option, done.completion_tokens, done.token_ids), stages


class EagerPipeline(InProcessPipeline):
    """The naive baseline a researcher would write from the paper's code: transformers'
    CLIPVisionModelWithProjection and Dinov2Model in eager PyTorch fp32 (the paper's features, via
    the export wrappers that define them), the projectors and the LLaMA in fp32, one request at a
    time with ``generate``, torch's default threads. No exported graph, no bf16, no server."""

    label = "eager PyTorch fp32"
    llm_dtype = "float32"
    autocast = False

    def __init__(self, profile, paths) -> None:
        from mofserve.core.checkpoints import load_fuser  # lazy: core.checkpoints imports torch

        # lazy: core.language_model imports torch and transformers
        from mofserve.core.language_model import VisualLanguageModel

        # lazy: export imports torch (and tritonclient's protobufs)
        from mofserve.export.configs import CLIP_VISION_EXPORT, DINOV2_VISION_EXPORT

        self.profile = profile
        self.precision = "bf16" if self.autocast else "fp32"
        self.runtime = "pytorch"
        self.engine = None
        self.modules = {"clip": CLIP_VISION_EXPORT.build_module(paths, profile),
                        "dinov2": DINOV2_VISION_EXPORT.build_module(paths, profile)}
        self.fuser = load_fuser(paths.llava)
        self.vlm = VisualLanguageModel.from_checkpoint(
            paths.llava, dtype=self.llm_dtype, default_max_new_tokens=profile.serving.max_new_tokens,
            max_new_tokens_limit=profile.serving.max_new_tokens_limit)

    def encode(self, encoder: str, pixels: np.ndarray):
        import contextlib

        import torch

        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            features, _pooled = self.modules[encoder](torch.from_numpy(pixels))
        return features.float()

    def answer(self, image: bytes, mode: str, question: str = QUESTION, options: str = OPTIONS,
               max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[PipelineAnswer, dict[str, float]]:
        stages = dict.fromkeys(STAGES, 0.0)
        tokens = self.visual_tokens(image, mode, stages)
        t = time.perf_counter()
        answer: Any = self.vlm.answer(tokens, question, options or None, max_new_tokens=max_new_tokens)
        stages["llm_ms"] = (time.perf_counter() - t) * 1e3
        return PipelineAnswer(answer.text, answer.chosen_option, answer.generated_tokens,
                              tuple(answer.token_ids)), stages


class EagerBf16Pipeline(EagerPipeline):
    """The eager baseline as a user who knows their CPU would write it: the same towers under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` (once per call: the fp32 weights are re-cast
    each time), the LLaMA loaded in bf16, ``generate``. Projectors in fp32, as served."""

    label = "eager PyTorch bf16"
    llm_dtype = "bfloat16"
    autocast = True
