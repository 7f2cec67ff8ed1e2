"""The encoder stages of the GPU check (``benchmarks/gpu_check.py``): ``accuracy``, ``eager`` and
``compiled:<encoder>`` on paper-shaped (or tiny) random encoders built on the device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from mofserve.benchmarks.flops import vit_flops, vit_shape_from_config
from mofserve.benchmarks.gpu_check_common import (
    ENCODERS,
    Part,
    Settings,
    _device,
    check_profile,
    log,
    measure_matmul,
    synchronize,
)


def random_encoder(name: str, profile, device):
    """The export wrapper of ``name`` around a seeded random model of the profile's shape, fp32,
    built directly on ``device`` (initialising 300M parameters on the CPU would take longer)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    from mofserve.core.checkpoints import quiet_transformers  # lazy: core.checkpoints imports torch

    # lazy: export imports torch (and tritonclient's protobufs)
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
    return float(vit_flops(vit_shape_from_config(module.model.config, profile.image_size)))


def export_config(name: str):
    from mofserve.export.configs import VISION_EXPORTS  # lazy: export imports torch (and tritonclient's protobufs)

    return next(c for c in VISION_EXPORTS if c.model_name == name)



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



def stage_accuracy(settings: Settings, part: Part) -> None:
    import torch

    # lazy: export imports torch (and tritonclient's protobufs)
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

    from mofserve.export.torch_runtime import TorchEncoder  # lazy: export imports torch (and tritonclient's protobufs)

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

