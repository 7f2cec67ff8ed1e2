"""Profiles: the one home of "which models, at which sizes, from where".

A profile names three checkpoint sources (a CLIP model, a DINOv2 model and a LLaVA-format
checkpoint holding the language model and the projectors) and the serving settings that go
with them. ``tiny``, ``small`` and ``paper-shaped`` are *seeded*: their checkpoints are built
from configs of the real architectures (small ones, or for ``paper-shaped`` exactly the paper's
shapes with a shallower LM), saved in the real formats and then loaded back through the same code
that loads ``paper``'s real checkpoints, so there is one loading path.

A profile is data: ``profile_configs/<name>.toml`` (a model is a file, as in open_clip's
``model_configs``), its reasons in comments beside its values. The dataclasses below are its
typed form: a file is read into them with errors that name the file and the key (an unknown key,
a value of the wrong type), and keys a file leaves out keep their defaults (and the reasons given
here). What depends on the machine is resolved each time a profile is read, never when this
module is imported, so that a test can change it: ``$MOFSERVE_HOME`` (the seeded checkpoints'
folder) and a file's ``[variables]``, values read from the environment (``paper``'s
``MOFSERVE_CLIP`` / ``MOFSERVE_DINOV2`` / ``MOFSERVE_LLAVA``, ``paper-shaped``'s LM depth) and
referenced as ``"${name}"``. The serve settings then override the sources (``server/config.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VisionSpec:
    """Size of a seeded ViT; ``native_image_size`` sets its position-embedding grid."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    native_image_size: int
    projection_dim: int = 0  # CLIP only: size of ``image_embeds``


@dataclass(frozen=True)
class LanguageSpec:
    """Size of a seeded LLaMA-family causal LM."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6  # LlamaConfig's default; LLaMA-2 and LLaVA-1.5 use 1e-5
    # dtype of the saved weights: "bfloat16" draws them straight in bf16 on a meta-initialised
    # model (a 7B-wide LM builds in seconds instead of a minute of fp32 init and a 2x larger file)
    dtype: str = "float32"


@dataclass(frozen=True)
class TextSpec:
    """Size of a seeded CLIP text tower (OpenAI's ViT-L/14 text tower is 768 wide, 12 layers)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int


# SeededSpec.tokenizer values: the LLM tokenizer a seeded LLaVA folder ships
BYTE_LEVEL_BPE = "byte-level-bpe"  # trained by `tokenizers` on a tiny corpus (tiny, small)
LLAMA_SENTENCEPIECE = "llama-sentencepiece"  # LLaMA's SentencePiece settings (core/assets/llama_sp)


@dataclass(frozen=True)
class SeededSpec:
    """How to build a profile's checkpoints from random weights (no download)."""

    seed: int
    clip: VisionSpec
    dino: VisionSpec
    llm: LanguageSpec
    clip_text: TextSpec | None = None  # None: the CLIP vision spec's sizes and the LM's vocabulary
    tokenizer: str = BYTE_LEVEL_BPE


@dataclass(frozen=True)
class Sources:
    """Where a profile's checkpoints come from: local folders or HF hub ids in the HF cache."""

    clip: str
    dinov2: str
    llava: str


@dataclass(frozen=True)
class ServingSpec:
    """Triton settings of a profile's repository (instances, batching, runtime)."""

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 2000
    encoder_instances: int = 1
    preprocess_instances: int = 2
    # Encoders on the cpu target: OpenVINO with a bf16 hint ran both ViT-B/14 encoders 1.8-2.2x
    # faster than ONNX Runtime fp32 at min token cosine 0.99996 (docs/benchmarks.md); export gates it
    # at cosine >= 0.999 against PyTorch fp32. "onnxruntime" serves exact fp32.
    runtime: str = "openvino"
    intra_op_threads: int = 0  # 0: the runtime's default (all cores)
    feature_cache_mb: int = 256  # per encoder instance; a seen image skips the encoder (0: off)
    llm_threads: int = 0  # torch intra-op threads of the LM (0: torch's default, all cores)
    llm_dtype: str = "float32"  # "bfloat16" halves the memory of a 7B/13B LM on CPU
    # In-flight batching (core.llm_engine): sequences sharing each decode step (1: one at a time)
    # and the KV pool split over them (0: each slot holds the model's context).
    llm_max_sequences: int = 8
    llm_kv_cache_mb: int = 0
    # Prompt positions a joining request prefills per engine turn, a decode step of the others
    # between each two (0: the whole prompt at once, as tiny and small keep it: their prompts are
    # short). Bounds the others' gap between tokens while a request joins; the paper profiles set
    # it (docs/benchmarks.md, "Chunked prefill").
    llm_prefill_chunk: int = 0
    max_new_tokens: int = 128  # default answer length (MMVP answers are short)
    max_new_tokens_limit: int = 512  # a request asking for more fails (INVALID_ARG)

    def __post_init__(self) -> None:
        # here, not in the llm model's initialize: a bad value stops `export`/`serve` before Triton starts
        if self.llm_max_sequences < 1:
            raise ValueError(f"serving.llm_max_sequences: must be at least 1, got {self.llm_max_sequences}")
        if self.llm_prefill_chunk < 0:
            raise ValueError(f"serving.llm_prefill_chunk: must be 0 (whole prompts) or positive, "
                             f"got {self.llm_prefill_chunk}")


@dataclass(frozen=True)
class Profile:
    name: str
    image_size: int
    patch_size: int
    default_alpha: float
    sources: Sources
    seeded: SeededSpec | None = None
    aspect: str = "crop"  # "crop": resize + centre crop (CLIP processor); "pad": LLaVA-1.5 expand2square
    dino_normalisation: str = "clip"  # "clip": DINOv2 sees the CLIP tensor (the paper); "imagenet"
    serving: ServingSpec = field(default_factory=ServingSpec)
    description: str = ""

    @property
    def random_weights(self) -> bool:
        """Answers from a seeded profile are not meaningful; every output must say so."""
        return self.seeded is not None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def with_sources(self, **overrides: str | None) -> Profile:
        """A copy whose sources are replaced where ``overrides`` gives a value."""
        given = {k: v for k, v in overrides.items() if v}
        return replace(self, sources=replace(self.sources, **given)) if given else self


def artifacts_dir() -> Path:
    """Root of built artefacts (checkpoints, ONNX graphs, repositories); git never sees it."""
    return Path(os.environ.get("MOFSERVE_HOME", Path.home() / ".cache" / "mofserve")).expanduser()


@dataclass(frozen=True)
class ProfileVariable:
    """A value of a profile file read from the environment when the profile is read: a file's
    ``[variables.<name>]`` table, referenced in its strings as ``"${name}"``. Unset or blank takes
    ``default``; an integer default makes the value an integer within ``[min, max]``."""

    env: str
    default: int | str
    help: str = ""  # what the value means: the error for a bad one says it
    min: int | None = None
    max: int | None = None

    def resolve(self, environ: Mapping[str, str]) -> int | str:
        raw = environ.get(self.env)
        if raw is None or not raw.strip():
            return self.default
        if isinstance(self.default, str):
            return raw
        raw = raw.strip()
        try:
            value = int(raw)
        except ValueError:
            value = None
        low = -math.inf if self.min is None else self.min
        high = math.inf if self.max is None else self.max
        if value is None or not low <= value <= high:
            meaning = f" ({self.help})" if self.help else ""
            raise ValueError(f"{self.env}: expected an integer within [{low}, {high}]{meaning}, got {raw!r}")
        return value


PROFILE_DIR = Path(__file__).resolve().parent / "profile_configs"
PROFILE_NAMES = tuple(sorted(path.stem for path in PROFILE_DIR.glob("*.toml")))


def get_profile(name: str) -> Profile:
    """The named profile as its file, its variables (environment) and MOFSERVE_HOME say now: any
    of them may change between two calls (tests do); a call that changes none is a cache hit."""
    return load_profile(_profile_file(name))


def load_profile(path: Path, environ: Mapping[str, str] | None = None) -> Profile:
    """The profile a TOML file describes (named by the file); see the module doc for the format."""
    path = Path(path)
    environ = os.environ if environ is None else environ
    mtime_ns = path.stat().st_mtime_ns
    variables = _parse(path, mtime_ns)[1]
    values = tuple((name, v.resolve(environ)) for name, v in variables.items())
    return _typed_profile(path, mtime_ns, values, artifacts_dir())


@cache
def _typed_profile(path: Path, mtime_ns: int, values: tuple[tuple[str, int | str], ...], home: Path) -> Profile:
    """The profile of one version of a file, one set of variable values and one MOFSERVE_HOME: what
    a profile depends on, so that a profile read per request is built once (a frozen dataclass)."""
    table = _substitute(_parse(path, mtime_ns)[0], dict(values), path, "")
    if "name" in table:
        raise ValueError(f"{path}: name: a profile is named by its file ({path.stem!r})")
    sources = _sources(path, table.pop("sources", None), "seeded" in table, home)
    return _dataclass(Profile, table, path, "", name=path.stem, sources=sources)


def profile_variables(name: str) -> dict[str, ProfileVariable]:
    """The environment variables a profile reads, by the name its file references them with."""
    path = _profile_file(name)
    return dict(_parse(path, path.stat().st_mtime_ns)[1])


def profile_environment() -> frozenset[str]:
    """Every environment variable a profile reads (the serve settings leave them to the profiles)."""
    return frozenset(v.env for name in PROFILE_NAMES for v in profile_variables(name).values())


def _profile_file(name: str) -> Path:
    if name not in PROFILE_NAMES:
        raise ValueError(f"profile: unknown profile {name!r}; expected one of {', '.join(PROFILE_NAMES)}")
    return PROFILE_DIR / f"{name}.toml"


@cache
def _parse(path: Path, mtime_ns: int) -> tuple[dict[str, Any], dict[str, ProfileVariable]]:
    """One version of a file: its tables but ``[variables]``, and its variables."""
    try:
        with path.open("rb") as file:
            table = tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML ({error})") from None
    return table, _variables(path, table.pop("variables", {}))


def _variables(path: Path, table: Any) -> dict[str, ProfileVariable]:
    if not isinstance(table, dict):
        raise ValueError(f"{path}: variables: expected a table, got {table!r}")
    found = {}
    for name, entry in table.items():
        where = f"variables.{name}"
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {where}: expected a table, got {entry!r}")
        variable = _dataclass(ProfileVariable, entry, path, where)
        if isinstance(variable.default, str) and (variable.min is not None or variable.max is not None):
            raise ValueError(f"{path}: {where}: min and max bound an integer, but default is {variable.default!r}")
        found[name] = variable
    return found


_REFERENCE = re.compile(r"\$\{(\w+)\}")


def _substitute(value: Any, values: Mapping[str, int | str], path: Path, where: str) -> Any:
    """``value`` with every ``${name}`` replaced; a string that is one reference takes the value's
    own type (``num_layers = "${llm_layers}"`` is an integer)."""
    if isinstance(value, dict):
        return {k: _substitute(v, values, path, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values, path, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def lookup(name: str) -> int | str:
        if name not in values:
            known = ", ".join(values) or "none"
            raise ValueError(f"{path}: {where}: unknown variable {name!r} (its [variables]: {known})")
        return values[name]

    whole = _REFERENCE.fullmatch(value)
    return lookup(whole[1]) if whole else _REFERENCE.sub(lambda m: str(lookup(m[1])), value)


def _sources(path: Path, table: Any, seeded: bool, home: Path) -> Sources:
    """``[sources]``: ``clip``, ``dinov2`` and ``llava``, or for a seeded profile ``folder`` under
    ``$MOFSERVE_HOME/checkpoints`` (default: the profile's name) holding the three it builds."""
    if table is None:
        if not seeded:
            raise ValueError(f"{path}: sources: missing (a profile that is not [seeded] names its checkpoints)")
        table = {"folder": path.stem}
    if not isinstance(table, dict):
        raise ValueError(f"{path}: sources: expected a table, got {table!r}")
    if "folder" not in table:
        return _dataclass(Sources, table, path, "sources")
    if len(table) > 1 or not seeded:
        raise ValueError(f"{path}: sources: folder is where a [seeded] profile builds its checkpoints; "
                         f"give either it alone or clip, dinov2 and llava")
    base = home / "checkpoints" / _typed(str, table["folder"], path, "sources.folder")
    return Sources(clip=str(base / "clip"), dinov2=str(base / "dinov2"), llava=str(base / "llava"))


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass(cls: type, table: Mapping[str, Any], path: Path, where: str, **given: Any) -> Any:
    """``cls`` from a TOML table: every key a field, every value of the field's type."""
    hints = _hints(cls)
    own = {f.name: f for f in fields(cls) if f.name not in given}
    for key in table:
        if key not in own:
            raise ValueError(f"{path}: {_join(where, key)}: unknown key; expected one of {', '.join(own)}")
    for name, spec in own.items():
        if name not in table and spec.default is MISSING and spec.default_factory is MISSING:
            raise ValueError(f"{path}: {_join(where, name)}: missing (required)")
    values = {k: _typed(hints[k], v, path, _join(where, k)) for k, v in table.items()}
    try:
        return cls(**values, **given)
    except ValueError as error:  # a class's own check (ServingSpec's bounds) names its key; add the file
        raise ValueError(f"{path}: {error}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _typed(kind: Any, value: Any, path: Path, where: str) -> Any:
    """``value`` as ``kind`` (a dataclass, ``X | None``, ``tuple[X, ...]``, int, float or str)."""
    if is_dataclass(kind):
        if isinstance(value, dict):
            return _dataclass(kind, value, path, where)
    elif typing.get_origin(kind) in (types.UnionType, typing.Union):
        errors = []
        for option in (a for a in typing.get_args(kind) if a is not type(None)):
            try:
                return _typed(option, value, path, where)
            except ValueError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
    elif typing.get_origin(kind) is tuple:
        if isinstance(value, list):
            return tuple(_typed(typing.get_args(kind)[0], v, path, f"{where}[{i}]") for i, v in enumerate(value))
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise ValueError(f"{path}: {where}: expected {_describe(kind)}, got {value!r} ({type(value).__name__})")


def _describe(kind: Any) -> str:
    if is_dataclass(kind):
        return "a table"
    if typing.get_origin(kind) is tuple:
        return f"an array of {_describe(typing.get_args(kind)[0])}"
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(kind) if a is not type(None))
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


# what tests and benchmarks set to change paper-shaped's LM depth (its file is the home of the name)
PAPER_SHAPED_LLM_LAYERS_ENV = profile_variables("paper-shaped")["llm_layers"].env


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that pick a profile and override its sources, shared by every command that builds
    models (export, demo, triton, the encoder and front-end benchmarks) so that they read alike."""
    parser.add_argument("--profile", default="tiny", choices=PROFILE_NAMES,
                        help="which models: tiny (seeded, default), small (seeded, benchmarks), paper")
    parser.add_argument("--clip", help="CLIP checkpoint folder or HF id in the HF cache (paper profile)")
    parser.add_argument("--dinov2", help="DINOv2 checkpoint folder or HF id in the HF cache (paper profile)")
    parser.add_argument("--llava", help="LLaVA-format checkpoint with mm_projector and dino_mm_projector")


def profile_from_args(args: argparse.Namespace) -> Profile:
    """The profile that :func:`add_profile_arguments`' flags name, with their source overrides."""
    return get_profile(args.profile).with_sources(clip=args.clip, dinov2=args.dinov2, llava=args.llava)
