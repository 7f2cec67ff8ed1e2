"""The prepared GPU check of the ``gpu-torch`` target (``benchmarks/gpu_check.sh OUTPUT_DIR``).

A GPU machine is lent for a few minutes at a time, with PyTorch but no registry, so this one
command must measure everything worth knowing in under 8 minutes, survive any stage failing,
and leave results behind whatever happens. Stages, each in its own subprocess with its own time
cap (a hung compile is killed, not waited for) and writing its part as it goes:

1. ``environment``: card, torch/CUDA versions, bf16 support; the bf16 matrix-multiply rate
   (8192^3, best of a few) that every share below is taken of.
2. ``accuracy``: paper-shaped encoders (CLIP ViT-L/14-336, DINOv2 ViT-L/14 at 336, random
   seeded weights built on the device, nothing downloaded) through the accuracy gate of
   ``export.torch_runtime``: bf16 vs fp32, min cosine per token row, gate >= 0.999.
3. ``eager``: images/s per encoder at batch 1, 8, 32, 64, eager bf16.
4. ``compiled:<encoder>``: the same with ``torch.compile`` (one static graph per batch size),
   largest batches first so that a cut-short stage still has the best-batch figure.
5. ``serving`` (optional): when the ``nvidia-pytriton`` wheel (and ``tritonclient``) is found,
   installs them with ``pip install --no-deps --target``, writes the gpu-torch repository for a
   paper-shaped random model, starts tritonserver with our launcher and sweeps concurrency per
   fusion mode over the ``tokens_<mode>`` ensembles.

Each encoder's FLOPs per image come from its shapes (``benchmarks.flops``); its share of the
bf16 rate uses the best run (as the ceiling does). ``--device cpu --profile tiny`` runs every
stage on the CPU in seconds, which is how the tests prove the code paths before anyone spends
GPU minutes. Writes ``gpu_check.json`` and ``gpu_check.md`` into the output folder and prints a
short table last.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

BATCHES = (1, 8, 32, 64)
ENCODERS = ("clip_vision", "dinov2_vision")
TARGET_SHARE = 0.5  # issue 8: both encoders at >= 50% of the measured bf16 matmul rate at their best batch
DEFAULT_BUDGET_S = 450.0  # the whole check must end within 8 minutes, start-up included
WHEELS_ENV = "MOFSERVE_WHEELS"
WHEEL_HINT = ("pip download nvidia-pytriton==0.7.0 tritonclient==2.73.0 --no-deps -d .whl "
              "(on a machine with a registry; bring .whl/ along with the working tree)")
# (stage, time cap in s on a GPU): the caps sum to well under the budget with room for serving
# (the compiled stages get the most: a first torch.compile of a ViT-L takes about a minute)
PLAN = (("environment", 30.0), ("accuracy", 45.0), ("eager", 60.0), ("compiled:clip_vision", 115.0),
        ("compiled:dinov2_vision", 115.0), ("serving", 240.0))
MIN_STAGE_S = 15.0  # a stage with less time than this left is skipped, not started


@dataclass
class Settings:
    out: Path
    device: str = "cuda"
    profile: str = "paper"
    budget_s: float = DEFAULT_BUDGET_S
    batches: tuple[int, ...] = BATCHES
    compile_mode: str = "default"
    matmul_n: int = 8192
    measure_s: float = 2.0  # timed seconds per (encoder, batch) at most
    max_runs: int = 30
    serve: bool = True
    wheels: Path | None = None
    instance_kind: str = "gpu"  # "cpu": the dry run serves the gpu-torch repository on CPU instances
    concurrency: tuple[int, ...] = (1, 4, 16)
    sweep_s: float = 5.0
    modes: tuple[str, ...] = ("clip", "dinov2", "additive", "interleaved")
    stages: tuple[str, ...] = field(default_factory=lambda: tuple(s for s, _ in PLAN))

    def argv(self) -> list[str]:
        """The command-line form of these settings (passed to each stage's subprocess)."""
        args = ["--out", str(self.out), "--device", self.device, "--profile", self.profile,
                "--budget-s", str(self.budget_s), "--batches", *map(str, self.batches),
                "--compile-mode", self.compile_mode, "--matmul-n", str(self.matmul_n),
                "--measure-s", str(self.measure_s), "--max-runs", str(self.max_runs),
                "--instance-kind", self.instance_kind, "--concurrency", *map(str, self.concurrency),
                "--sweep-s", str(self.sweep_s), "--modes", *self.modes]
        if self.wheels:
            args += ["--wheels", str(self.wheels)]
        if not self.serve:
            args.append("--no-serve")
        return args


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class StageSkipped(Exception):
    """A stage cannot run here (no wheel, no CUDA...): recorded with its reason, not as a failure."""


# --------------------------------------------------------------------------------------------
# Models: paper-shaped (or tiny) random encoders, built on the device


def check_profile(name: str):
    """``paper``: the paper's encoder shapes with seeded random weights (no checkpoint needed);
    ``tiny``: the tests' profile."""
    from mofserve.core.profiles import (
        LanguageSpec,
        Profile,
        SeededSpec,
        ServingSpec,
        Sources,
        VisionSpec,
        artifacts_dir,
        get_profile,
    )

    if name == "tiny":
        return get_profile("tiny")
    if name != "paper":
        raise ValueError(f"profile: expected paper or tiny, got {name!r}")
    base = artifacts_dir() / "checkpoints" / "paper-random"
    return Profile(
        name="paper-random", image_size=336, patch_size=14, default_alpha=0.75,
        sources=Sources(clip=str(base / "clip"), dinov2=str(base / "dinov2"), llava=str(base / "llava")),
        seeded=SeededSpec(
            seed=0,
            clip=VisionSpec(1024, 24, 16, 4096, native_image_size=336, projection_dim=768),  # ViT-L/14-336
            dino=VisionSpec(1024, 24, 16, 4096, native_image_size=518),  # dinov2-large
            # a 1-layer LM of Vicuna-7B's width: the fusion emits 4096-wide tokens as in the paper
            llm=LanguageSpec(4096, 1, 32, 32, 1024, vocab_size=512, max_position_embeddings=2048)),
        serving=ServingSpec(max_batch_size=8, preferred_batch_sizes=(8,), max_queue_delay_us=2000,
                            llm_dtype="bfloat16"),
        description="paper-shaped encoders with random weights (GPU check)")


def random_encoder(name: str, profile, device):
    """The export wrapper of ``name`` around a seeded random model of the profile's shape, fp32,
    built directly on ``device`` (initialising 300M parameters on the CPU would take longer)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    from mofserve.core.checkpoints import quiet_transformers
    from mofserve.export.configs import ClipVisionFeatures, Dinov2Features

    quiet_transformers()
    spec = profile.seeded
    torch.manual_seed(spec.seed + (0 if name == "clip_vision" else 1))
    with torch.device(device):
        if name == "clip_vision":
            v = spec.clip
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                num_attention_heads=v.num_heads, image_size=v.native_image_size, patch_size=profile.patch_size,
                projection_dim=v.projection_dim)).eval()
            return ClipVisionFeatures(model).eval()
        v = spec.dino
        model = Dinov2Model(Dinov2Config(
            hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
            mlp_ratio=v.intermediate_size // v.hidden_size, image_size=v.native_image_size,
            patch_size=profile.patch_size)).eval()
        return Dinov2Features(model, profile.image_size, renormalise=profile.dino_normalisation == "imagenet").eval()


def encoder_flops(module, profile) -> float:
    from mofserve.benchmarks.flops import vit_flops, vit_shape_from_config

    return float(vit_flops(vit_shape_from_config(module.model.config, profile.image_size)))


def export_config(name: str):
    from mofserve.export.configs import VISION_EXPORTS

    return next(c for c in VISION_EXPORTS if c.model_name == name)


# --------------------------------------------------------------------------------------------
# Measurements


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul(device, n: int, runs: int = 5) -> float:
    """Best bf16 ``[n, n] x [n, n]`` rate in GFLOP/s on ``device`` (the ceiling shares are taken of)."""
    import torch

    from mofserve.benchmarks.encoders import matmul_gflops

    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(torch.bfloat16)
    b = torch.randn(n, n, device=device, generator=generator).to(torch.bfloat16)
    torch.matmul(a, b)
    synchronize(device)
    best = math.inf
    for _ in range(runs):
        started = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return matmul_gflops(n, best)


def time_batches(encoder, batch: int, measure_s: float, max_runs: int, warmup: int = 2) -> dict:
    """Images/s of ``encoder`` at ``batch``: the first call's seconds (a compile, when compiled),
    then timed runs until ``measure_s`` or ``max_runs`` (at least 3)."""
    x = encoder.example(batch).normal_()
    started = time.perf_counter()
    encoder(x)
    synchronize(encoder.device)
    first_s = time.perf_counter() - started
    for _ in range(warmup - 1):
        encoder(x)
    synchronize(encoder.device)
    times: list[float] = []
    window = time.perf_counter()
    while len(times) < 3 or (len(times) < max_runs and time.perf_counter() - window < measure_s):
        started = time.perf_counter()
        encoder(x)
        synchronize(encoder.device)
        times.append(time.perf_counter() - started)
    return {"batch": batch, "first_call_s": round(first_s, 3), "runs": len(times),
            "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "images_per_s": batch / statistics.median(times), "best_images_per_s": batch / min(times)}


def score(row: dict, flops_per_image: float, ceiling_gflops: float | None) -> dict:
    """Add achieved GFLOP/s (best run, like the ceiling) and the share of the bf16 ceiling."""
    row = dict(row)
    row["gflops_per_s"] = flops_per_image * row["best_images_per_s"] / 1e9
    row["share_of_ceiling"] = row["gflops_per_s"] / ceiling_gflops if ceiling_gflops else None
    return row


# --------------------------------------------------------------------------------------------
# Stages (each runs in its own subprocess; ``part`` is written as results come in)


class Part:
    """One stage's results, rewritten to disk at every update so a killed stage leaves them."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def update(self, **values) -> None:
        self.data.update(values)
        self.path.write_text(json.dumps(self.data, indent=2, default=_json_default))


def _device(settings: Settings):
    import torch

    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise StageSkipped("no CUDA device: torch.cuda.is_available() is False")
    return torch.device(settings.device)


def stage_environment(settings: Settings, part: Part) -> None:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "host": platform.node()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError as error:
        info["transformers"] = f"missing: {error}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(card=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                    multiprocessors=props.multi_processor_count)
    else:
        info.update(card=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    part.update(environment=info)
    device = _device(settings)
    rates = [measure_matmul(device, settings.matmul_n) for _ in range(2)]
    part.update(matmul={"n": settings.matmul_n, "dtype": "bf16", "gflops_per_s": max(rates), "runs": rates})


def stage_accuracy(settings: Settings, part: Part) -> None:
    import torch

    from mofserve.export.torch_runtime import GATE, AccuracyGateError, TorchEncoder, gate_batches, serving_dtype

    device = _device(settings)
    profile = check_profile(settings.profile)
    dtype = serving_dtype(device) if device.type == "cuda" else torch.bfloat16
    results = {}
    for name in ENCODERS:
        config = export_config(name)
        started = time.perf_counter()
        module = random_encoder(name, profile, device)
        batches = gate_batches(config, module, None, profile)
        try:
            encoder = TorchEncoder.from_fp32(module, config, device, dtype, gate=GATE, batches=batches, log=log)
            gate, error = encoder.gate, None
        except AccuracyGateError as failure:
            gate, error = None, str(failure)
        results[name] = {"dtype": str(dtype).replace("torch.", ""), "inputs": list(batches),
                         "min_cosine": gate.min_cosine if gate else None, "ok": error is None, "error": error,
                         "attention": getattr(module.model.config, "_attn_implementation", None),
                         "seconds": round(time.perf_counter() - started, 2)}
        part.update(accuracy=results)
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _bench(settings: Settings, part: Part, names: Sequence[str], compile_mode: str, key: str,
           order: Sequence[int]) -> None:
    import torch

    from mofserve.export.torch_runtime import TorchEncoder

    device = _device(settings)
    profile = check_profile(settings.profile)
    dtype = torch.bfloat16
    ceiling = measure_matmul(device, settings.matmul_n)
    results: dict = {"ceiling_gflops_per_s": ceiling, "compile_mode": compile_mode, "dtype": "bf16"}
    for name in names:
        config = export_config(name)
        module = random_encoder(name, profile, device)
        flops = encoder_flops(module, profile)
        encoder = TorchEncoder(module, name, config.input_name, config.output_names, device=device, dtype=dtype,
                               compile_mode=compile_mode, example=config.example(module, profile))
        rows = results.setdefault(name, {"flops_per_image": flops, "batches": {}})
        for batch in order:
            log(f"{key} {name} batch {batch}")
            try:
                rows["batches"][str(batch)] = score(time_batches(encoder, batch, settings.measure_s,
                                                                 settings.max_runs), flops, ceiling)
            except torch.cuda.OutOfMemoryError as error:
                rows["batches"][str(batch)] = {"batch": batch, "error": f"out of memory: {error}"}
            part.update(**{key: results})
        del encoder, module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["ceiling_after_gflops_per_s"] = measure_matmul(device, settings.matmul_n)
    part.update(**{key: results})


def stage_eager(settings: Settings, part: Part) -> None:
    # largest first, as in the compiled stages: the best batch is measured before a cap can strike
    _bench(settings, part, ENCODERS, "none", "eager", sorted(settings.batches, reverse=True))


def stage_compiled(settings: Settings, part: Part, name: str) -> None:
    # largest first: a stage cut short by its time cap still has the best-batch figure
    _bench(settings, part, (name,), settings.compile_mode, "compiled", sorted(settings.batches, reverse=True))


# ---- serving ----

def install_triton_packages(wheels: Path | None, target: Path, installed: bool | None = None) -> Path | None:
    """Make ``pytriton`` (the tritonserver binary) and ``tritonclient`` importable: nothing to do
    where they are installed; else ``pip install --no-deps --target`` of the wheels brought along
    (a plain unzip, executables re-marked, where pip is missing). Returns the folder to put on
    ``sys.path``/``PYTHONPATH``, or None."""
    import importlib.util

    if installed is None:
        installed = bool(importlib.util.find_spec("pytriton") and importlib.util.find_spec("tritonclient"))
    if installed:
        return None
    folder = Path(wheels) if wheels else None
    found = sorted(folder.glob("*.whl")) if folder and folder.is_dir() else []
    wanted = [w for w in found if w.name.startswith(("nvidia_pytriton-", "tritonclient-"))]
    if not any(w.name.startswith("nvidia_pytriton-") for w in wanted):
        raise StageSkipped(f"no nvidia-pytriton wheel in {folder or '(no wheel folder)'}; fetch it with: {WHEEL_HINT}")
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target", str(target),
               *map(str, wanted)]
    try:
        subprocess.run(command, check=True, timeout=120, capture_output=True)
        log(f"installed {', '.join(w.name for w in wanted)} into {target}")
    except (subprocess.SubprocessError, OSError) as error:
        log(f"pip install failed ({error}); unpacking the wheels instead")
        for wheel in wanted:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
        for path in target.rglob("*"):
            if path.is_file() and (path.parent.name == "bin" or path.name.endswith("_stub") or ".so" in path.name):
                path.chmod(path.stat().st_mode | 0o111)
    return target


def sample_images(count: int, seed: int = 0) -> list[bytes]:
    """Distinct encoded PNG images (random smooth colour fields), so no cache could answer twice."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((400, 300), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def sweep_point(url: str, model: str, images: Sequence[bytes], concurrency: int, seconds: float,
                output: str) -> dict:
    """``concurrency`` closed-loop clients on ``model`` for ``seconds``; each asks only for ``output``
    (a timing), so the visual tokens are computed but not shipped to the client."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from mofserve.benchmarks.stats import latency_summary

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(index: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        k = index
        while time.perf_counter() < stop_at:
            tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[images[k % len(images)]]], dtype=np.object_))
            k += concurrency
            started = time.perf_counter()
            try:
                client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(output)], client_timeout=60)
                with lock:
                    latencies.append((time.perf_counter() - started) * 1e3)
            except Exception as error:
                with lock:
                    errors.append(str(error)[:200])
        client.close()

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 90)
    elapsed = time.perf_counter() - began
    return {"model": model, "concurrency": concurrency, "seconds": round(elapsed, 2),
            "requests_per_s": len(latencies) / elapsed, "latency_ms": latency_summary(latencies),
            "errors": len(errors), "first_error": errors[0] if errors else None}


PARITY_ALPHA = 0.3


def served_parity(url: str, profile, paths, images: Sequence[bytes], settings: Settings) -> dict:
    """The served visual tokens against an in-process fp32 reference on the same images (the same
    preprocessing, encoders and projectors, no Triton): min cosine per token of ``tokens_interleaved``
    and of ``tokens_additive`` at ``ALPHA`` 0.3; and the error an out-of-range ``ALPHA`` gets."""
    import numpy as np
    import torch
    import tritonclient.grpc as grpcclient

    from mofserve.core import tensors as T
    from mofserve.core.checkpoints import load_fuser
    from mofserve.core.preprocessing import preprocess_bytes
    from mofserve.export.parity import row_cosines
    from mofserve.export.torch_runtime import TorchEncoder

    device = torch.device("cuda" if settings.instance_kind == "gpu" else "cpu")
    pixels = torch.from_numpy(np.stack([preprocess_bytes(b, profile.image_size, aspect=profile.aspect)
                                        for b in images]))
    features = {}
    for config in (export_config(T.CLIP_VISION), export_config(T.DINOV2_VISION)):
        encoder = TorchEncoder.load(config, paths, profile, device=device, dtype="fp32", gate=None, log=log)
        features[config.model_name] = encoder(pixels)[0]
        del encoder
    fuser = load_fuser(paths.llava).to(device)
    clip, dino = features[T.CLIP_VISION], features[T.DINOV2_VISION]
    client = grpcclient.InferenceServerClient(url)

    def served(model: str, alpha: float | None) -> np.ndarray:
        rows = []
        for data in images:
            inputs = [grpcclient.InferInput(T.IMAGE, [1, 1], "BYTES")]
            inputs[0].set_data_from_numpy(np.array([[data]], dtype=np.object_))
            if alpha is not None:
                inputs.append(grpcclient.InferInput(T.ALPHA, [1, 1], "FP32"))
                inputs[1].set_data_from_numpy(np.array([[alpha]], dtype=np.float32))
            result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(T.VISUAL_TOKENS)])
            rows.append(result.as_numpy(T.VISUAL_TOKENS)[0])
        return np.stack(rows)

    out: dict = {}
    for mode, alpha in ((T.FusionMode.INTERLEAVED, None), (T.FusionMode.ADDITIVE, PARITY_ALPHA)):
        reference = fuser(mode, clip, dino, None if alpha is None else torch.full((len(images),), alpha,
                                                                                  device=device))
        got = served(T.tokens_model(mode), alpha)
        out[T.tokens_model(mode)] = {"min_cosine": float(row_cosines(reference.float().cpu().numpy(), got).min()),
                                     "alpha": alpha, "shape": list(got.shape)}
        log(f"serving parity {T.tokens_model(mode)}: min cosine {out[T.tokens_model(mode)]['min_cosine']:.6f} "
            "against in-process fp32")
    try:
        served(T.tokens_model(T.FusionMode.ADDITIVE), 1.5)
        out["alpha_1.5"] = "accepted (expected INVALID_ARG)"
    except Exception as error:  # tritonclient's InferenceServerException
        out["alpha_1.5"] = str(error)[:200]
    client.close()
    return out


def triton_model_stats(url: str) -> dict:
    """Per model: executions, inferences (so the mean dynamic batch) and compute ms per execution."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics(as_json=True).get("model_stats", [])
    client.close()
    out = {}
    for s in stats:
        executions, inferences = int(s.get("execution_count", 0)), int(s.get("inference_count", 0))
        if not executions:
            continue
        compute = s.get("inference_stats", {}).get("compute_infer", {})
        out[s["name"]] = {"executions": executions, "inferences": inferences,
                          "mean_batch": inferences / executions,
                          "compute_ms_per_execution": int(compute.get("ns", 0)) / 1e6 / executions}
    return out


def stage_serving(settings: Settings, part: Part, deadline: float) -> None:
    if not settings.serve:
        raise StageSkipped("--no-serve")
    if settings.instance_kind == "gpu":
        _device(settings)
    work = Path(tempfile.mkdtemp(prefix="mofserve-gpu-check-"))
    site = install_triton_packages(settings.wheels, work / "site")
    if site is not None:
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    from tritonclient.grpc import model_config_pb2 as mc

    from mofserve.core import tensors as T
    from mofserve.core.checkpoints import read_shapes, resolve_profile
    from mofserve.export.repository import repository_specs, write_repository
    from mofserve.server.launcher import TritonServer

    profile = check_profile(settings.profile)
    started = time.perf_counter()
    log(f"serving: seeded {profile.name} checkpoints (built once, random weights)")
    paths = resolve_profile(profile)
    shapes = read_shapes(paths, profile)
    part.update(serving={"checkpoints_s": round(time.perf_counter() - started, 1)})
    # the sweep drives tokens_<mode> only: the LM, vqa_<mode> and the text models are left out so
    # that the server starts sooner (their configs are the gpu-torch target's all the same)
    # and so are the fusion modes neither swept nor checked (served_parity checks interleaved and additive)
    kept = {*settings.modes, T.FusionMode.INTERLEAVED, T.FusionMode.ADDITIVE}
    unused = {T.LLM, T.TOKENIZE_TEXT, T.CLIP_TEXT, T.EMBED_TEXT, *(T.vqa_model(m) for m in T.FusionMode),
              *(name for m in T.FusionMode if m not in kept for name in (T.fuse_model(m), T.tokens_model(m)))}
    specs = [s for s in repository_specs(profile, "gpu-torch", paths, shapes, {}) if s.name not in unused]
    for spec in specs:
        if settings.instance_kind == "cpu":  # the dry run: the same repository on CPU instances
            for group in spec.config.instance_group:
                group.kind = mc.ModelInstanceGroup.KIND_CPU
    repo = write_repository(specs, work / "repository")
    log_file = settings.out / "tritonserver.log"
    server = TritonServer(repo, log_file=log_file, response_cache_bytes=0)
    started = time.perf_counter()
    try:
        server.start(timeout=max(30.0, deadline - time.time() - 30))
        info: dict = {"checkpoints_s": part.data["serving"]["checkpoints_s"],
                      "start_s": round(time.perf_counter() - started, 1), "repository": str(repo), "points": []}
        part.update(serving=info)
        images = sample_images(16)
        url = server.grpc_url.replace("grpc://", "")
        info["parity"] = served_parity(url, profile, paths, images[:2], settings)
        part.update(serving=info)
        for mode in settings.modes:
            model = T.tokens_model(mode)
            sweep_point(url, model, images[:2], 1, min(1.0, settings.sweep_s), T.TIMING_FUSION)  # warm-up
            for concurrency in settings.concurrency:
                if time.time() + settings.sweep_s + 10 > deadline:
                    info["cut_short"] = f"time budget reached before {model} at concurrency {concurrency}"
                    break
                point = sweep_point(url, model, images, concurrency, settings.sweep_s, T.TIMING_FUSION)
                info["points"].append({"mode": mode, **point})
                log(f"serving {model} c={concurrency}: {point['requests_per_s']:.1f} req/s, "
                    f"p50 {point['latency_ms']['p50']:.1f} ms, errors {point['errors']}")
                part.update(serving=info)
        info["triton_models"] = triton_model_stats(url)
        part.update(serving=info)
    finally:
        server.stop(timeout=10)  # python stubs holding torch can be slow to exit; their work is done
        shutil.rmtree(work, ignore_errors=True)


def stage_checkpoints(settings: Settings, part: Part) -> None:
    """Build the serving stage's seeded checkpoints (runs in the background from the start, on a few
    CPU threads so that the compiles beside it keep most of the cores)."""
    import torch

    from mofserve.core.checkpoints import resolve_profile

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    started = time.perf_counter()
    resolve_profile(check_profile(settings.profile))
    part.update(seconds=round(time.perf_counter() - started, 1))


def run_stage(stage: str, settings: Settings, part_path: Path, deadline: float) -> int:
    part = Part(part_path)
    try:
        if stage == "checkpoints":
            stage_checkpoints(settings, part)
        elif stage == "environment":
            stage_environment(settings, part)
        elif stage == "accuracy":
            stage_accuracy(settings, part)
        elif stage == "eager":
            stage_eager(settings, part)
        elif stage.startswith("compiled:"):
            stage_compiled(settings, part, stage.split(":", 1)[1])
        elif stage == "serving":
            stage_serving(settings, part, deadline)
        else:
            raise ValueError(f"stage: unknown stage {stage!r}")
    except StageSkipped as reason:
        part.update(skipped=str(reason))
        log(f"{stage}: skipped: {reason}")
        return 0
    return 0


# --------------------------------------------------------------------------------------------
# Orchestration, report


def stage_caps(settings: Settings) -> list[tuple[str, float]]:
    """The stages to run with their time caps; the CPU dry run (tiny models) needs far less."""
    plan = [(s, cap) for s, cap in PLAN if s in settings.stages or s.split(":")[0] in settings.stages]
    return plan


Runner = Callable[[list[str], float], tuple[int, str]]


def run_all(settings: Settings, runner: Runner | None = None) -> dict:
    """Run every stage in a subprocess within the budget; return (and write) the merged report."""
    settings.out.mkdir(parents=True, exist_ok=True)
    parts = settings.out / "parts"
    parts.mkdir(exist_ok=True)
    began = time.time()
    deadline = began + settings.budget_s
    report: dict = {"started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "settings": {k: v for k, v in asdict(settings).items() if k != "out"}, "stages": {}}
    runner = runner or _subprocess_runner
    plan = stage_caps(settings)
    # the serving stage's checkpoints (CPU work: random init, gigabytes written) are built meanwhile
    background = (_start_background("checkpoints", settings, parts)
                  if settings.serve and any(stage == "serving" for stage, _ in plan) else None)
    try:
        _run_plan(plan, settings, report, runner, parts, began, deadline, background)
    finally:
        if background is not None and background.poll() is None:
            _stop_group(background, 2.0)
    report["summary"] = summarise(report)
    write_report(report, settings.out)
    return report


def _start_background(stage: str, settings: Settings, parts: Path) -> subprocess.Popen:
    part_path = parts / f"{stage}.json"
    part_path.unlink(missing_ok=True)
    log(f"stage {stage}: in the background (output in {parts / (stage + '.log')})")
    with open(parts / f"{stage}.log", "wb") as output:
        return subprocess.Popen([sys.executable, "-m", "mofserve.benchmarks.gpu_check", "--stage", stage,
                                 "--part", str(part_path), *settings.argv()], stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _run_plan(plan: Sequence[tuple[str, float]], settings: Settings, report: dict, runner: Runner, parts: Path,
              began: float, deadline: float, background: subprocess.Popen | None) -> None:
    """Run the planned stages one by one, each in ``runner`` under its cap, merging their parts."""
    for stage, cap in plan:
        if stage == "serving" and background is not None:
            wait_s = max(0.0, deadline - time.time() - MIN_STAGE_S)
            try:  # the serving stage builds the checkpoints itself if this did not
                background.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                _stop_group(background, 2.0)
            part = parts / "checkpoints.json"
            report["checkpoints"] = {"rc": background.returncode,
                                     **(json.loads(part.read_text()) if part.is_file() else {})}
        left = deadline - time.time()
        if left < MIN_STAGE_S:
            report["stages"][stage] = {"status": "skipped", "reason": f"time budget spent ({left:.0f} s left)"}
            continue
        # the last stage takes what is left; a stage stopped at its cap gets STOP_GRACE_S more to stop
        timeout = left - STOP_GRACE_S if stage == "serving" else min(cap, left - STOP_GRACE_S)
        part_path = parts / f"{stage.replace(':', '_')}.json"
        part_path.unlink(missing_ok=True)
        log(f"stage {stage}: up to {timeout:.0f} s")
        stage_began = time.time()
        command = [sys.executable, "-m", "mofserve.benchmarks.gpu_check", "--stage", stage, "--part", str(part_path),
                   "--deadline", str(stage_began + timeout), *settings.argv()]
        rc, tail = runner(command, timeout)
        data = json.loads(part_path.read_text()) if part_path.is_file() else {}
        status = "skipped" if "skipped" in data else ("ok" if rc == 0 else "timed out" if rc == 124 else "failed")
        entry = {"status": status, "seconds": round(time.time() - stage_began, 1), "rc": rc}
        if "skipped" in data:
            entry["reason"] = data.pop("skipped")
        if status in ("failed", "timed out"):
            entry["log_tail"] = tail
            log(f"stage {stage}: {status} (rc {rc}); partial results kept\n{tail}")
        report["stages"][stage] = entry
        merge_part(report, stage, data)
        report["seconds"] = round(time.time() - began, 1)
        write_report(report, settings.out)


STOP_GRACE_S = 10.0  # SIGTERM first (a serving stage stops its tritonserver), SIGKILL after this


def _stop_group(process: subprocess.Popen, grace: float) -> None:
    """Stop a stage's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    import signal

    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _subprocess_runner(command: list[str], timeout: float) -> tuple[int, str]:
    """Run one stage in its own process group, its output streamed to stderr as it comes; at
    ``timeout`` the group is stopped (a compile cannot be interrupted from inside), rc 124."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=25)

    def pump() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(process, STOP_GRACE_S)
        rc = 124
    except BaseException:  # the check itself is being stopped: take the stage down with it
        _stop_group(process, 2.0)
        raise
    reader.join(5.0)
    return rc, "\n".join(tail)


def merge_part(report: dict, stage: str, data: Mapping) -> None:
    for key, value in data.items():
        if key == "compiled":
            compiled = report.setdefault("compiled", {})
            compiled.update({k: v for k, v in value.items() if k in ENCODERS})
            ceilings = report.setdefault("ceilings", [])
            ceilings += [value[k] for k in ("ceiling_gflops_per_s", "ceiling_after_gflops_per_s") if k in value]
            compiled["compile_mode"] = value.get("compile_mode")
        else:
            report[key] = value
            if key == "eager":
                report.setdefault("ceilings", []).extend(
                    value[k] for k in ("ceiling_gflops_per_s", "ceiling_after_gflops_per_s") if k in value)
            if key == "matmul":
                report.setdefault("ceilings", []).append(value["gflops_per_s"])


def _best(rows: Mapping) -> dict | None:
    scored = [r for r in rows.get("batches", {}).values() if "best_images_per_s" in r]
    return max(scored, key=lambda r: r["best_images_per_s"]) if scored else None


def summarise(report: dict) -> dict:
    """Per encoder: the best batch eager and compiled, the share of the best measured bf16 rate
    (rescored against the best ceiling of the whole run), the gate; and whether the target is met."""
    ceilings = [c for c in report.get("ceilings", []) if c]
    ceiling = max(ceilings) if ceilings else None
    out: dict = {"ceiling_gflops_per_s": ceiling, "encoders": {}}
    for name in ENCODERS:
        entry: dict = {}
        for kind in ("eager", "compiled"):
            rows = report.get(kind, {}).get(name)
            best = _best(rows) if rows else None
            if best:
                share = rows["flops_per_image"] * best["best_images_per_s"] / 1e9 / ceiling if ceiling else None
                entry[kind] = {"batch": best["batch"], "images_per_s": best["best_images_per_s"], "share": share}
        gate = report.get("accuracy", {}).get(name, {})
        entry["min_cosine"] = gate.get("min_cosine")
        shares = [v["share"] for k, v in entry.items() if k in ("eager", "compiled") and v.get("share") is not None]
        entry["target_met"] = (max(shares) >= TARGET_SHARE) if shares else None
        out["encoders"][name] = entry
    return out


def _f(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: Mapping) -> str:
    """The short table printed last."""
    summary = report.get("summary") or summarise(dict(report))
    env = report.get("environment", {})
    lines = [f"card: {env.get('card', '?')}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}; "
             f"bf16 matmul ceiling {_f((summary['ceiling_gflops_per_s'] or 0) / 1e3, '.2f')} TFLOP/s",
             "| encoder | eager bf16 img/s (batch) | share | compiled bf16 img/s (batch) | share | gate min cos | "
             f">= {TARGET_SHARE:.0%} |", "|---|---|---|---|---|---|---|"]
    for name, e in summary["encoders"].items():
        cells = []
        for kind in ("eager", "compiled"):
            v = e.get(kind)
            cells += [f"{v['images_per_s']:.1f} ({v['batch']})" if v else "-",
                      f"{v['share']:.1%}" if v and v.get("share") is not None else "-"]
        met = {True: "yes", False: "no", None: "-"}[e["target_met"]]
        lines.append(f"| {name} | {' | '.join(cells)} | {_f(e['min_cosine'], '.6f')} | {met} |")
    statuses = ", ".join(f"{k} {v['status']}" for k, v in report.get("stages", {}).items())
    lines.append(f"stages: {statuses}")
    serving = report.get("serving", {})
    if serving.get("points"):
        best = max(serving["points"], key=lambda p: p["requests_per_s"])
        lines.append(f"serving: best {best['requests_per_s']:.1f} req/s ({best['model']}, c={best['concurrency']}, "
                     f"p50 {best['latency_ms']['p50']:.1f} ms)")
    return "\n".join(lines)


def format_markdown(report: Mapping) -> str:
    lines = ["# GPU check (gpu-torch)", "", f"Started {report.get('started')}, {report.get('seconds', '?')} s.", "",
             format_table(report), ""]
    for kind in ("eager", "compiled"):
        section = report.get(kind, {})
        if not any(name in section for name in ENCODERS):
            continue
        lines += [f"## {kind} bf16 (per batch)", "", "| encoder | batch | img/s (median) | img/s (best) | ms/batch "
                  "(median) | first call s | GFLOP/s | share |", "|---|---|---|---|---|---|---|---|"]
        for name in ENCODERS:
            for row in sorted(section.get(name, {}).get("batches", {}).values(), key=lambda r: r["batch"]):
                if "error" in row:
                    lines.append(f"| {name} | {row['batch']} | {row['error']} | | | | | |")
                    continue
                lines.append(f"| {name} | {row['batch']} | {row['images_per_s']:.1f} | {row['best_images_per_s']:.1f}"
                             f" | {row['median_ms']:.2f} | {row['first_call_s']:.1f} | {row['gflops_per_s']:.0f} | "
                             f"{_f(row.get('share_of_ceiling'), '.1%')} |")
        lines.append("")
    serving = report.get("serving", {})
    if serving.get("points"):
        lines += ["## Serving (Triton, tokens_<mode>, closed loop)", "",
                  f"Checkpoints {serving.get('checkpoints_s')} s, server start {serving.get('start_s')} s.", "",
                  "| model | concurrency | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
        for p in serving["points"]:
            lat = p["latency_ms"]
            lines.append(f"| {p['model']} | {p['concurrency']} | {p['requests_per_s']:.1f} | {_f(lat['p50'])} | "
                         f"{_f(lat['p99'])} | {p['errors']} |")
        lines.append("")
    lines += ["## Stages", "", "| stage | status | s | note |", "|---|---|---|---|"]
    checkpoints = report.get("checkpoints")
    if checkpoints:
        status = "ok" if checkpoints.get("rc") == 0 else f"rc {checkpoints.get('rc')}"
        lines.append(f"| checkpoints (background) | {status} | {checkpoints.get('seconds', '')} | "
                     "seeded checkpoints of the serving stage |")
    for stage, entry in report.get("stages", {}).items():
        note = entry.get("reason") or (entry.get("log_tail", "").splitlines() or [""])[-1]
        lines.append(f"| {stage} | {entry['status']} | {entry.get('seconds', '')} | {note[:160]} |")
    return "\n".join(lines) + "\n"


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def write_report(report: Mapping, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (out / "gpu_check.md").write_text(format_markdown(report))


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GPU check of the gpu-torch target (see docs/benchmarks.md)")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json / gpu_check.md")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    parser.add_argument("--profile", default="paper", choices=("paper", "tiny"))
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time for all stages")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs", "none"),
                        help="torch.compile mode of the compiled stage (none: its plumbing only, for dry runs)")
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--measure-s", type=float, default=2.0)
    parser.add_argument("--max-runs", type=int, default=30)
    parser.add_argument("--no-serve", dest="serve", action="store_false")
    parser.add_argument("--wheels", type=Path, default=os.environ.get(WHEELS_ENV),
                        help=f"folder with the nvidia-pytriton and tritonclient wheels (${WHEELS_ENV})")
    parser.add_argument("--instance-kind", default="gpu", choices=("gpu", "cpu"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sweep-s", type=float, default=5.0)
    parser.add_argument("--modes", nargs="+", default=["clip", "dinov2", "additive", "interleaved"])
    parser.add_argument("--stages", nargs="+", default=[s for s, _ in PLAN],
                        help="subset of: environment accuracy eager compiled serving (or compiled:<encoder>)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    for name in ("budget_s", "measure_s", "sweep_s"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if any(b < 1 for b in args.batches) or any(c < 1 for c in args.concurrency):
        raise SystemExit("--batches/--concurrency: must be positive integers")
    return Settings(out=args.out, device=args.device, profile=args.profile, budget_s=args.budget_s,
                    batches=tuple(args.batches), compile_mode=args.compile_mode, matmul_n=args.matmul_n,
                    measure_s=args.measure_s, max_runs=args.max_runs, serve=args.serve,
                    wheels=Path(args.wheels) if args.wheels else None, instance_kind=args.instance_kind,
                    concurrency=tuple(args.concurrency), sweep_s=args.sweep_s, modes=tuple(args.modes),
                    stages=tuple(args.stages))


def _exit_on_sigterm() -> None:
    """SIGTERM (the time cap, or ``timeout`` around the script) raises SystemExit, so that a serving
    stage stops its tritonserver and the orchestrator stops the running stage."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    _exit_on_sigterm()
    if args.stage:
        return run_stage(args.stage, settings, args.part, args.deadline or time.time() + settings.budget_s)
    report = run_all(settings)
    print(format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
