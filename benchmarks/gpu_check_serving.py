"""The serving stage of the GPU check (``benchmarks/gpu_check.py``): the gpu-torch repository for a
paper-shaped random model, tritonserver from the ``nvidia-pytriton`` wheel, parity against an
in-process reference and closed-loop sweeps per fusion mode; and the background stage that builds
its seeded checkpoints while the other stages run."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from mofserve.benchmarks.gpu_check_common import Part, Settings, StageSkipped, _device, check_profile, log
from mofserve.benchmarks.gpu_check_encoders import export_config
from mofserve.benchmarks.stats import latency_summary
from mofserve.core import tensors as T
from mofserve.server.launcher import TritonServer

WHEEL_HINT = ("pip download nvidia-pytriton==0.7.0 tritonclient==2.73.0 --no-deps -d .whl "
              "(on a machine with a registry; bring .whl/ along with the working tree)")


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

    from mofserve.core.checkpoints import load_fuser  # lazy: core.checkpoints imports torch

    # lazy: a GPU-check stage imports only what it runs (its own process, on a machine with other packages)
    from mofserve.core.preprocessing import preprocess_bytes
    from mofserve.export.parity import row_cosines  # lazy: export imports torch (and tritonclient's protobufs)
    from mofserve.export.torch_runtime import TorchEncoder  # lazy: export imports torch (and tritonclient's protobufs)

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

    from mofserve.core.checkpoints import read_shapes, resolve_profile  # lazy: core.checkpoints imports torch

    # lazy: export imports torch (and tritonclient's protobufs)
    from mofserve.export.repository import repository_specs, write_repository

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
        if "feature_cache_bytes" in spec.config.parameters:
            # the sweep cycles through 16 images: with the encoders' feature cache on, it would time
            # cache lookups instead of the encoders
            spec.config.parameters["feature_cache_bytes"].string_value = "0"
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

    from mofserve.core.checkpoints import resolve_profile  # lazy: core.checkpoints imports torch

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    started = time.perf_counter()
    resolve_profile(check_profile(settings.profile))
    part.update(seconds=round(time.perf_counter() - started, 1))

