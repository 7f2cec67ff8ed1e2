# mofserve on NVIDIA's Triton image: `mofserve serve` runs Triton as a child process and answers
# on its own gRPC (50051) and OpenAI-compatible HTTP (8080) front-ends. Triton's HTTP, gRPC and
# metrics endpoints bind 127.0.0.1 inside the container and are deliberately not exposed.
#
#   docker build -t mofserve:0.1.0 .
#   docker run --gpus all --shm-size=1g --init -p 50051:50051 -p 8080:8080 \
#       -v /srv/models:/models:ro -v /srv/engine-cache:/engine-cache -v /srv/mofserve:/var/lib/mofserve \
#       mofserve:0.1.0
#
# docs/deployment.md explains every flag and mount, and what `--target gpu-trt` still lacks.
#
# Base image: Triton release 25.10 (CUDA 13.0.2; Ubuntu 24.04, Python 3.12). Any release from
# 24.12 on fixes the gRPC crash on a cancelled in-flight request
# (triton-inference-server/server#7368) that server/engine.py works around by never cancelling;
# 25.10 is chosen because its CUDA 13.0 is the CUDA that torch 2.13.0's Linux wheel on PyPI is
# built for (it depends on cuda-toolkit 13.0.x), so one driver (>= 580) serves both.
# Pinned by tag; pin by digest (`@sha256:...`) in production registries.
FROM nvcr.io/nvidia/tritonserver:25.10-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# MOFSERVE_TRITONSERVER_ROOT makes `serve` run the image's Triton (/opt/tritonserver: TensorRT,
# ONNX Runtime and python backends) instead of the python-backend-only 2.51 build inside the
# nvidia-pytriton wheel, which the project still installs and uses outside containers.
# The image's system Python 3.12 is the one the python-backend stub embeds, so the project is
# installed there (PEP 668 marks it externally managed: PIP_BREAK_SYSTEM_PACKAGES=1, on purpose).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    MOFSERVE_HOME=/var/lib/mofserve \
    MOFSERVE_CACHE_DIR=/var/lib/mofserve/cache \
    HF_HOME=/models/huggingface \
    HF_HUB_OFFLINE=1 \
    MOFSERVE_TRITONSERVER_ROOT=/opt/tritonserver

WORKDIR /opt/mofserve

# torch first, on its own layer: the PyPI wheel of torch 2.13.0 for Linux x86_64 is the CUDA 13.0
# build (the GPU image needs CUDA torch for the fusion and llm python models on KIND_GPU); the
# project pins torch==2.13.0 exactly and the install below keeps it pinned so that pip never
# swaps it for another build.
RUN pip install --no-cache-dir torch==2.13.0

COPY pyproject.toml setup.py README.md ./
COPY requirements/ requirements/
COPY mofserve/ mofserve/
COPY core/ core/
COPY export/ export/
COPY model_repository/ model_repository/
COPY server/ server/
COPY clients/ clients/
COPY benchmarks/ benchmarks/
COPY evaluation/ evaluation/

# A regular (non-editable) install: setup.py's build_py compiles the gRPC stubs into the wheel.
RUN pip install --no-cache-dir -c requirements/constraints.txt torch==2.13.0 . \
    && mofserve --help > /dev/null

# Non-root: Triton needs no privileges here (no port below 1024, GPUs come from the runtime).
# /engine-cache matches `trt_engine_cache_path` of the gpu-onnx target (export/repository.py).
# Numeric ids, so that Kubernetes' runAsNonRoot can verify them.
RUN groupadd --gid 10001 mofserve \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin mofserve \
    && mkdir -p /models /engine-cache /var/lib/mofserve/cache \
    && chown -R 10001:10001 /engine-cache /var/lib/mofserve
USER 10001:10001

# Front-end ports only: gRPC (mofserve.v1.MofServe, health, reflection) and HTTP (OpenAI API,
# /healthz, /metrics). Triton's ports are picked on loopback and never published.
EXPOSE 50051 8080

# /healthz answers 200 only while Triton is ready (503 while the supervisor restarts it). The
# start period covers the first export and, for gpu-trt, engine loading.
# With TLS on (MOFSERVE_TLS_CERT_FILE) the check speaks HTTPS to loopback without verifying the
# certificate: it asks whether this container serves, not who it is. /healthz needs no token.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, ssl, urllib.request; tls = bool(os.environ.get('MOFSERVE_TLS_CERT_FILE')); urllib.request.urlopen(('https' if tls else 'http') + '://127.0.0.1:%s/healthz' % os.environ.get('MOFSERVE_HTTP_PORT', '8080'), timeout=4, context=ssl._create_unverified_context() if tls else None)"]

# nvidia_entrypoint.sh (the base image's entrypoint) sets up CUDA forward compatibility, then
# execs the command. Inside a container the front-end must bind 0.0.0.0 to be reachable;
# Triton stays on loopback whatever --host says.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "mofserve", "serve", "--target", "gpu-trt", "--host", "0.0.0.0"]
CMD ["--profile", "paper", "--clip", "/models/clip-vit-large-patch14-336", "--dinov2", "/models/dinov2-large", \
     "--llava", "/models/MoF_Models"]
