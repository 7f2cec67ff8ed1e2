"""The ``gpu-torch`` runtime: the encoders as PyTorch modules on the device, no ONNX in the path.

Why a PyTorch path at all: the TensorRT and ONNX-Runtime-GPU targets need packages that a
machine with only PyTorch lacks. This module runs the SAME wrappers the ONNX export traces
(``export.configs``: CLIP ``hidden_states[-2]`` patches + ``image_embeds``, DINOv2 pre-norm
patches + normed CLS with the position embeddings baked at the serving size, CLIP's text tower),
loaded from the same checkpoints, so that every target serves the same features.

* **dtype**: bf16 on a CUDA device (fp16 where the card has no bf16), fp32 on the CPU (the tests
  compare that with the ONNX graph); any of them can be asked for explicitly.
* **batch buckets**: with ``torch.compile`` (optionally with CUDA graphs, mode
  ``reduce-overhead``) every new batch size is a new graph, so a batch is padded up to the
  smallest bucket that holds it (rows beyond the largest bucket run in chunks of it); the
  buckets are compiled once at start-up (:meth:`TorchEncoder.warm_up`).
* **accuracy gate**: before serving, the fp32 module's outputs on random tensors and real photos
  are compared with the serving dtype's (min cosine per token row, ``export.parity``); below
  0.999 the encoder refuses to start (:class:`AccuracyGateError`), and the min cosine is printed
  either way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mofserve.core.checkpoints import CheckpointPaths
from mofserve.core.profiles import CLIP_MEAN, CLIP_STD, Profile, Sources

from .configs import EXPORTS, ClipTextEmbeds, ExportConfig, TextExportConfig
from .onnx_export import parity_batches, text_parity_batches
from .parity import BF16, OutputParity, ParityError, Tolerance, compare

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
GATE: Tolerance = BF16  # min cosine >= 0.999 against fp32, the gate of every reduced-precision runtime

Log = Callable[[str], None]


_logger = logging.getLogger(__name__)


class AccuracyGateError(ParityError):
    """The serving dtype's features drift from fp32 beyond the gate: the encoder must not serve."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: the first CUDA device when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but torch sees no CUDA device")
    return resolved


def serving_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The dtype the encoders run in: ``auto`` is bf16 on a CUDA device that has it, fp16 on one
    that does not (pre-Ampere), fp32 on the CPU."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def parse_buckets(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """Batch buckets from ``"1,8"`` or a sequence: positive, sorted, unique (empty: no padding)."""
    if text is None or text == "":
        return ()
    values = [int(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if any(v < 1 for v in values):
        raise ValueError(f"buckets: batch buckets must be positive integers, got {list(values)}")
    return tuple(sorted(set(values)))


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``rows`` (``rows`` itself when there are no buckets or when it
    is larger than every bucket: the caller chunks those by the largest)."""
    return next((b for b in buckets if b >= rows), rows)


def chunks(rows: int, buckets: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges, each at most the largest bucket."""
    step = max(buckets) if buckets else rows
    return [(start, min(start + step, rows)) for start in range(0, rows, max(step, 1))]


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 inside: the gate's reference must be fp32 (cuDNN convolutions default to TF32)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def gate_batches(config: ExportConfig, module: nn.Module, paths: CheckpointPaths | None,
                 profile: Profile) -> dict[str, np.ndarray]:
    """The inputs of the accuracy gate: those of the export's parity check (random tensors and real
    photos; token ids and real sentences for the text tower). Where scikit-image's photos are not
    installed (a bare GPU machine), smooth synthetic images stand in for the photos."""
    if isinstance(config, TextExportConfig):
        if paths is None:
            raise ValueError("paths: the text tower's gate needs the checkpoint's tokenizer")
        return text_parity_batches(module, paths)
    try:
        return parity_batches(profile)
    except (ImportError, FileNotFoundError):
        return synthetic_batches(profile.image_size)


def synthetic_batches(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random normal tensors (batch 2) and smooth gradient images with a bright disc (batch 3),
    normalised like CLIP inputs: a stand-in for photos where none are installed."""
    rng = np.random.default_rng(seed)
    random = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    mean, std = (np.array(v, np.float32)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
    images = []
    for k in range(3):
        disc = ((x - 0.3 - 0.2 * k) ** 2 + (y - 0.5) ** 2 < 0.05).astype(np.float32)
        rgb = np.stack([x * (k + 1) % 1.0, y, 0.5 * disc + 0.3 * (1 - x)])
        images.append((rgb - mean) / std)
    return {"random[2]": random, "synthetic[3]": np.stack(images).astype(np.float32)}


@dataclass(frozen=True)
class GateResult:
    """What the accuracy gate saw: every output on every batch, and the verdict."""

    dtype: str
    checks: tuple[OutputParity, ...]

    @property
    def min_cosine(self) -> float:
        return min(c.min_cosine for c in self.checks)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def line(self, name: str) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"{name}: accuracy gate {self.dtype} vs fp32: min cosine {self.min_cosine:.6f} "
                f"(gate >= {GATE.min_cosine}) {verdict}")


class TorchEncoder:
    """One encoder wrapper on a device, in one dtype, optionally compiled per batch bucket.

    ``__call__`` takes a batch (CPU or device tensor) and returns the outputs on the device in
    fp32 (the tensor contract's type), one tensor per output name.
    """

    def __init__(self, module: nn.Module, name: str, input_name: str, output_names: Sequence[str], *,
                 device: torch.device, dtype: torch.dtype, compile_mode: str = "none",
                 buckets: Sequence[int] = (), example: torch.Tensor | None = None) -> None:
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile: expected one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        self.name, self.input_name, self.output_names = name, input_name, tuple(output_names)
        self.device, self.dtype, self.compile_mode = device, dtype, compile_mode
        self.buckets = parse_buckets(buckets)
        self.module = module.to(device=device, dtype=dtype).eval()
        self.gate: GateResult | None = None
        self.row_example = example  # a batch-1 input (export.configs' tracing example): warm-up shapes
        # dynamic=False: one static graph per bucket (the buckets are why a batch is padded)
        self._forward = (self.module if compile_mode == "none"
                         else torch.compile(self.module, mode=None if compile_mode == "default" else compile_mode,
                                            dynamic=False))

    @classmethod
    def load(cls, config: ExportConfig, paths: CheckpointPaths, profile: Profile, *,
             device: str | torch.device | None = None, dtype: str = "auto", compile_mode: str = "none",
             buckets: Sequence[int] = (), gate: Tolerance | None = GATE, log: Log = _logger.info) -> TorchEncoder:
        """Load the wrapper from its checkpoint (``export.configs``), gate it against fp32, compile it."""
        started = time.perf_counter()
        resolved = resolve_device(device)
        module = config.build_module(paths, profile)
        log(f"{config.model_name}: loaded {config.checkpoint(paths)} in {time.perf_counter() - started:.1f} s")
        batches = None if gate is None else gate_batches(config, module, paths, profile)
        return cls.from_fp32(module, config, resolved, serving_dtype(resolved, dtype), compile_mode=compile_mode,
                             buckets=buckets, gate=gate, batches=batches, example=config.example(module, profile),
                             log=log)

    @classmethod
    def from_fp32(cls, module: nn.Module, config: ExportConfig, device: torch.device, dtype: torch.dtype, *,
                  compile_mode: str = "none", buckets: Sequence[int] = (), gate: Tolerance | None = GATE,
                  batches: Mapping[str, np.ndarray] | None = None, example: torch.Tensor | None = None,
                  log: Log = _logger.info) -> TorchEncoder:
        """Wrap an fp32 module; with ``gate``, its fp32 outputs on ``batches`` are taken on the device
        first, then the module is cast in place (one copy of the weights) and gated."""
        references = None
        if gate is not None:
            if not batches:
                raise ValueError("batches: the accuracy gate needs inputs")
            module = module.to(device=device, dtype=torch.float32).eval()
            with torch.inference_mode(), exact_fp32():
                references = {label: [t.float().cpu().numpy() for t in module(torch.from_numpy(b).to(device))]
                              for label, b in batches.items()}
        encoder = cls(module, config.model_name, config.input_name, config.output_names, device=device, dtype=dtype,
                      compile_mode=compile_mode, buckets=buckets, example=example)
        if gate is not None:
            assert references is not None and batches is not None
            encoder.check_gate(batches, references, gate, log=log)
        return encoder

    def check_gate(self, batches: Mapping[str, np.ndarray], references: Mapping[str, Sequence[np.ndarray]],
                   tolerance: Tolerance = GATE, log: Log = _logger.info) -> GateResult:
        """Compare this encoder's outputs with fp32 ``references``; print the min cosine; raise
        :class:`AccuracyGateError` below the gate."""
        checks = []
        for label, batch in batches.items():
            outputs = self(torch.from_numpy(batch))
            for name, ref, got in zip(self.output_names, references[label], outputs, strict=True):
                checks.append(compare(name, label, ref, got.cpu().numpy(), tolerance))
        self.gate = GateResult(dtype_name(self.dtype), tuple(checks))
        log(self.gate.line(self.name))
        if not self.gate.ok:
            raise AccuracyGateError(f"{self.name}: refuses to serve in {self.gate.dtype}: features drift from fp32 "
                                    f"(min cosine {self.gate.min_cosine:.6f} < {tolerance.min_cosine}):\n"
                                    + "\n".join(c.line() for c in checks if not c.ok))
        return self.gate

    def example(self, rows: int) -> torch.Tensor:
        """A zero batch of ``rows`` shaped like this encoder's input (pixels, or token ids)."""
        if self.row_example is None:
            raise ValueError(f"{self.name}: no example input was given, so buckets cannot be warmed up")
        dtype = self.dtype if self.row_example.is_floating_point() else self.row_example.dtype
        return torch.zeros((rows, *self.row_example.shape[1:]), dtype=dtype, device=self.device)

    def warm_up(self, log: Log = _logger.info) -> dict[int, float]:
        """Run every bucket once (compiling it when compiled); seconds per bucket."""
        seconds = {}
        for bucket in self.buckets:
            started = time.perf_counter()
            self(self.example(bucket))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds[bucket] = time.perf_counter() - started
            log(f"{self.name}: bucket {bucket} ready in {seconds[bucket]:.1f} s ({self.compile_mode})")
        return seconds

    @property
    def vocab_size(self) -> int | None:
        """The text tower's vocabulary size (token ids must lie below it); None for a vision tower."""
        if not isinstance(self.module, ClipTextEmbeds):
            return None
        return int(self.module.model.config.vocab_size)

    def check_ids(self, ids: torch.Tensor) -> None:
        """Refuse token ids outside the vocabulary (``ValueError`` naming ``input_ids``) before they
        reach the embedding: on a CUDA device an out-of-range index is a device-side assert, which
        leaves the process's CUDA context unusable (the instance would fail every later request)."""
        vocab = self.vocab_size
        if vocab is None or ids.numel() == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids: token ids must lie in [0, {vocab}), got {low if low < 0 else high}")

    def __call__(self, batch: torch.Tensor, out_dtype: torch.dtype | None = torch.float32) -> tuple[torch.Tensor, ...]:
        """The outputs in ``out_dtype`` (the contract's fp32 by default; None: the serving dtype, e.g.
        bf16 values that widen to the fp32 ones exactly, which is how the feature cache keeps them)."""
        rows = int(batch.shape[0])
        x = batch.to(self.device, non_blocking=True)
        if x.is_floating_point():
            x = x.to(self.dtype)
        parts: list[tuple[torch.Tensor, ...]] = []
        with torch.inference_mode():
            for start, stop in chunks(rows, self.buckets):
                piece = x[start:stop]
                n, padded = stop - start, bucket_for(stop - start, self.buckets)
                if padded > n:
                    piece = torch.cat([piece, piece.new_zeros((padded - n, *piece.shape[1:]))])
                outputs = self._forward(piece)
                # a copy (in fp32, the contract's type, unless asked otherwise): CUDA-graph outputs are
                # reused by the next replay
                parts.append(tuple(t[:n].to(out_dtype or t.dtype, copy=True) for t in outputs))
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(group) for group in zip(*parts, strict=True))


# ---- the Triton side: what a gpu-torch repository's config says, and how a model loads from it ----

def encoder_parameters(model_name: str, profile: Profile, paths: CheckpointPaths, *, dtype: str = "auto",
                       compile_mode: str = "none", buckets: Sequence[int] = ()) -> dict[str, str]:
    """The ``parameters`` of a gpu-torch encoder's config: everything :func:`load_from_parameters`
    needs to rebuild the same wrapper (checkpoints, the profile's shape settings, runtime knobs)."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile: expected one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    return {"model": model_name, "profile": profile.name, "clip": str(paths.clip), "dinov2": str(paths.dinov2),
            "llava": str(paths.llava), "image_size": str(profile.image_size), "patch_size": str(profile.patch_size),
            "aspect": profile.aspect, "dino_normalisation": profile.dino_normalisation, "dtype": dtype,
            "compile": compile_mode, "buckets": ",".join(str(b) for b in parse_buckets(buckets))}


def load_from_parameters(params: Mapping[str, str], device: str | torch.device | None = None,
                         log: Log = _logger.info) -> TorchEncoder:
    """The encoder a gpu-torch config describes (``encoder_parameters``), gated and warmed up."""
    configs = {c.model_name: c for c in EXPORTS}
    if params.get("model") not in configs:
        raise ValueError(f"model: expected one of {', '.join(configs)}, got {params.get('model')!r}")
    paths = CheckpointPaths(Path(params["clip"]), Path(params["dinov2"]), Path(params["llava"]))
    profile = Profile(name=params.get("profile", "?"), image_size=int(params["image_size"]),
                      patch_size=int(params["patch_size"]), default_alpha=0.0,
                      sources=Sources(params["clip"], params["dinov2"], params["llava"]),
                      aspect=params.get("aspect", "crop"), dino_normalisation=params.get("dino_normalisation", "clip"))
    encoder = TorchEncoder.load(configs[params["model"]], paths, profile, device=device,
                                dtype=params.get("dtype", "auto"), compile_mode=params.get("compile", "none"),
                                buckets=parse_buckets(params.get("buckets", "")), log=log)
    encoder.warm_up(log=log)
    return encoder
