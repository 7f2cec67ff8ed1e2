"""Seeded checkpoints: small configs of the REAL architectures with random weights.

They are written in the same formats as the real checkpoints (a ``CLIPModel`` folder, a
``Dinov2Model`` folder, a LLaVA-format folder with LLaMA weights, ``mm_projector`` and
``dino_mm_projector`` keys in safetensors, and a tokenizer trained offline) so that they load
through ``core.checkpoints`` exactly like ``paper``'s. Answers from them are not meaningful.

The ``paper-shaped`` LLaVA folder ships what LLaVA-1.5 checkpoints ship: a SentencePiece
``tokenizer.model`` with LLaMA's settings (``core/assets/llama_sp``, trained offline by the script
beside it) and a ``LlamaTokenizer`` config (BOS added, pad = unk), written alone by
``write_llama_tokenizer``. Its 7B-wide LM is drawn straight in bf16 on a meta-initialised model
(seconds, not a minute of fp32 init) and written in 2 GB safetensors shards with an index, as HF
shards real checkpoints, so that the 32-layer depth never holds the whole LM in memory twice.

The CLIP folder also gets a CLIP tokenizer (``CLIPTokenizer``: CLIP's normaliser, split regex,
byte-level BPE with ``</w>`` word ends), trained offline on a small corpus to the text tower's
vocabulary size, with ``<|startoftext|>`` and ``<|endoftext|>`` as the two HIGHEST ids as in
OpenAI's vocabulary (49406, 49407). The text config keeps OpenAI's legacy ``eos_token_id=2``, so
the text tower pools at ``argmax(input_ids)`` (the end-of-text token) exactly as
``openai/clip-vit-large-patch14-336`` does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .disk_space import room_for, tensor_bytes
from .fusion import CLIP_PROJECTOR_PREFIX, DINO_PROJECTOR_PREFIX, PROJECTOR_TYPE, Projector
from .profiles import BYTE_LEVEL_BPE, CLIP_MEAN, CLIP_STD, LLAMA_SENTENCEPIECE, Profile, SeededSpec

MARKER = ".mofserve-seeded.json"
_FORMAT_VERSION = 2  # 2: the CLIP folder carries a CLIP tokenizer
LLAMA_TOKENIZER_MODEL = Path(__file__).resolve().parent / "assets" / "llama_sp" / "tokenizer.model"
# Spec fields added after format 2 enter the digest only when they differ from these defaults, so
# that tiny's and small's folders (and the exports cached from them) stay valid.
_LATER_DEFAULTS = {"clip_text": None, "tokenizer": BYTE_LEVEL_BPE}
_LATER_LLM_DEFAULTS = {"rms_norm_eps": 1e-6, "dtype": "float32"}
_SHARD_BYTES = 2 * 1024**3
_INIT_STD = 0.02  # LlamaConfig.initializer_range
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _spec_payload(spec: SeededSpec) -> dict:
    payload = asdict(spec)
    for key, default in _LATER_DEFAULTS.items():
        if payload[key] == default:
            del payload[key]
    for key, default in _LATER_LLM_DEFAULTS.items():
        if payload["llm"][key] == default:
            del payload["llm"][key]
    return payload


def _spec_digest(profile: Profile) -> str:
    assert profile.seeded is not None
    payload = {"v": _FORMAT_VERSION, "spec": _spec_payload(profile.seeded), "image_size": profile.image_size,
               "patch_size": profile.patch_size, "aspect": profile.aspect}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ensure_seeded_checkpoints(profile: Profile) -> None:
    """Build the profile's checkpoints unless folders with the same spec digest already exist."""
    digest = _spec_digest(profile)
    dirs = [Path(profile.sources.clip), Path(profile.sources.dinov2), Path(profile.sources.llava)]
    if all(_marker_matches(d, digest) for d in dirs):
        return
    build_seeded_checkpoints(profile, *dirs)
    for d in dirs:
        (d / MARKER).write_text(json.dumps({"profile": profile.name, "digest": digest}))


def _marker_matches(folder: Path, digest: str) -> bool:
    marker = folder / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("digest") == digest


def build_seeded_checkpoints(profile: Profile, clip_dir: Path, dino_dir: Path, llava_dir: Path) -> None:
    spec = profile.seeded
    assert spec is not None, f"profile {profile.name} is not seeded"
    torch.manual_seed(spec.seed)
    for d in (clip_dir, dino_dir, llava_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    _build_clip(spec, profile, clip_dir)
    _build_dinov2(spec, profile, dino_dir)
    _build_llava(spec, profile, llava_dir)


def _build_clip(spec: SeededSpec, profile: Profile, out: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    v = spec.clip
    t = spec.clip_text
    text = (dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                 num_attention_heads=t.num_heads, vocab_size=t.vocab_size) if t is not None else
            dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                 num_attention_heads=v.num_heads, vocab_size=spec.llm.vocab_size))
    config = CLIPConfig(
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                           image_size=v.native_image_size, patch_size=profile.patch_size,
                           projection_dim=v.projection_dim),
        text_config=dict(**text, max_position_embeddings=77,
                         projection_dim=v.projection_dim,
                         # OpenAI's released text config: eos_token_id 2 makes HF pool at argmax(ids)
                         bos_token_id=0, pad_token_id=1, eos_token_id=2),
        projection_dim=v.projection_dim,
    )
    model = CLIPModel(config).eval()
    with room_for(out, tensor_bytes(model.state_dict().values()), "the seeded CLIP checkpoint"):
        model.save_pretrained(out)
    CLIPImageProcessorPil(
        size={"shortest_edge": profile.image_size},
        crop_size={"height": profile.image_size, "width": profile.image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    ).save_pretrained(out)
    build_clip_tokenizer(config.text_config.vocab_size).save_pretrained(out)


def _build_dinov2(spec: SeededSpec, profile: Profile, out: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    v = spec.dino
    config = Dinov2Config(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
                          num_attention_heads=v.num_heads, mlp_ratio=v.intermediate_size // v.hidden_size,
                          image_size=v.native_image_size, patch_size=profile.patch_size)
    model = Dinov2Model(config).eval()
    with room_for(out, tensor_bytes(model.state_dict().values()), "the seeded DINOv2 checkpoint"):
        model.save_pretrained(out)


# A small corpus in the shape of what the LLM will read: the LLaVA v1 template and MMVP questions.
_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "USER: <image>\nIs the dog facing left or right from the camera's perspective? (a) Left (b) Right "
    "ASSISTANT: (a) Left",
    "USER: Are the butterfly's wings closer to being open or closed? (a) Open (b) Closed ASSISTANT: (b)",
    "Is the elderly person standing or sitting in the picture? (a) Standing (b) Sitting",
    "How many eyes can you see in the image? (a) One (b) Two. Is there a shadow on the flower?",
    "What color is the text on the sign? (a) Red (b) Blue. Is the door of the truck open or closed?",
    "Are there any words displayed on the vehicle's lightbar? (a) Yes (b) No. In the image, is the "
    "flame of the match more towards the left or right?",
    "0 1 2 3 4 5 6 7 8 9 yes no left right up down top bottom front back open closed one two three",
]


# What the CLIP text tower reads: MMVP-VLM statements behind "a photo of ".
_CLIP_CORPUS = [
    "a photo of the dog facing left. a photo of the dog facing right.",
    "a photo of the butterfly with its wings open. a photo of the butterfly with its wings closed.",
    "a photo of an elderly person standing. a photo of an elderly person sitting.",
    "a photo of one eye visible. a photo of two eyes visible. a photo of three cups on the table.",
    "a photo of a red sign with white text. a photo of a blue truck with the door open.",
    "a photo of the flame of the match pointing up, seen from the front, the back, the top.",
    "a photo of a shadow on the flower in the picture; the camera looks down at the car.",
]


def _word_final_bytes() -> list[int]:
    """Every byte a word of valid UTF-8 can END with: ASCII that is not white space (CLIP splits on
    it) and the continuation bytes 0x80..0xBF. Each gets a ``<byte></w>`` token, so no text maps to
    the unknown token, which for CLIP is ``<|endoftext|>``: the token the text tower pools at."""
    white_space = (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20)
    return [b for b in range(0x80) if b not in white_space] + list(range(0x80, 0xC0))


def build_clip_tokenizer(vocab_size: int):
    """A ``CLIPTokenizer`` with at most ``vocab_size`` ids (see the module doc), trained by a small
    deterministic BPE (the ``tokenizers`` trainer breaks ties between equally frequent pairs by ids
    it assigns in hash order, so two builds could differ): words are CLIP-normalised and
    pre-tokenised by CLIP's own pipeline; ids are the 256 bytes, the word-final ``<byte></w>``
    tokens, one token per merge (the most frequent pair, ties to the smallest), then
    ``<|startoftext|>`` and ``<|endoftext|>``."""
    from collections import Counter
    from itertools import pairwise

    from transformers import CLIPTokenizer

    template = CLIPTokenizer().backend_tokenizer  # CLIP's normaliser and pre-tokeniser, exactly
    byte_char = _byte_level_chars()
    alphabet = [byte_char[b] for b in range(256)]
    words: Counter[str] = Counter()
    for line in [*_CLIP_CORPUS, *_CORPUS]:
        normalised = template.normalizer.normalize_str(line)
        words.update(word for word, _ in template.pre_tokenizer.pre_tokenize_str(normalised))
    vocab = [*alphabet, *(byte_char[b] + "</w>" for b in _word_final_bytes())]
    if vocab_size < len(vocab) + 2:
        raise ValueError(f"vocab_size: a CLIP tokenizer needs at least {len(vocab) + 2} ids, got {vocab_size}")
    splits = {word: [*word[:-1], word[-1] + "</w>"] for word in words}
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    while len(vocab) < vocab_size - 2:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            parts = splits[word]
            for pair in pairwise(parts):
                pairs[pair] += count
        if not pairs:
            break
        a, b = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append((a, b))
        if a + b not in known:
            known.add(a + b)
            vocab.append(a + b)
        for word, parts in splits.items():
            i, merged = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[word] = merged
    ids = {token: i for i, token in enumerate([*vocab, "<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=ids, merges=merges, model_max_length=77)


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenisation writes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>", model_max_length=2048)


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_llama_tokenizer(out: Path, legacy: bool = True, model_max_length: int = 2048) -> None:
    """Write LLaMA's tokenizer files as LLaVA-1.5 checkpoints carry them into ``out``: the SentencePiece
    ``tokenizer.model``, a ``LlamaTokenizer`` config (BOS added, no EOS, LLaVA's pad = unk) and
    ``special_tokens_map.json``; ``AutoTokenizer.from_pretrained(out)`` reads them back."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(LLAMA_TOKENIZER_MODEL, out / "tokenizer.model")
    special = {"bos_token": _added_token("<s>"), "eos_token": _added_token("</s>"),
               "unk_token": _added_token("<unk>"), "pad_token": "<unk>"}
    config = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "legacy": legacy, "model_max_length": model_max_length, "padding_side": "right",
              "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
              **{k: {"__type": "AddedToken", **v} if isinstance(v, dict) else v for k, v in special.items()}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True))


def _llama_config(spec: SeededSpec, vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import LlamaConfig

    m = spec.llm
    return LlamaConfig(hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                       num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                       intermediate_size=m.intermediate_size, vocab_size=vocab_size,
                       max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.rms_norm_eps,
                       bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)


def _drawn_llama_state(llama, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """A ``LlamaForCausalLM`` state dict drawn straight in ``dtype``: the model is built on the meta
    device (shapes only), matrices are N(0, initializer_range), RMSNorm weights ones (HF's init)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(llama).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            state[key] = (torch.ones if key.endswith("norm.weight") else torch.zeros)(shape, dtype=dtype)
        else:
            state[key] = torch.empty(shape, dtype=dtype).normal_(0.0, _INIT_STD, generator=generator)
    return state


def _save_sharded(state: dict[str, torch.Tensor], out: Path) -> None:
    """``model.safetensors``, or HF-style ``model-0000i-of-0000n.safetensors`` + index when larger
    than a shard; ``core.checkpoints`` reads both."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    if len(shards) == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_llava_text_files(profile: Profile, out: Path):
    """The profile's LLaVA folder without its weights: the tokenizer files and ``config.json``, and
    the ``LlamaConfig`` inside it. Enough for ``AutoTokenizer.from_pretrained(out)``, which also reads
    ``config.json``: its ``model_type: llava`` decides which tokenizer class transformers builds."""
    spec = profile.seeded
    assert spec is not None, f"profile {profile.name} is not seeded"
    m = spec.llm
    out.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer == LLAMA_SENTENCEPIECE:
        write_llama_tokenizer(out)
        llama = _llama_config(spec, m.vocab_size, bos=1, eos=2, pad=0)  # LLaMA's ids; pad = <unk>
    elif spec.tokenizer == BYTE_LEVEL_BPE:
        tokenizer = _build_tokenizer(m.vocab_size)
        tokenizer.save_pretrained(out)
        llama = _llama_config(spec, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                              tokenizer.pad_token_id)
    else:
        raise ValueError(f"tokenizer: unknown seeded tokenizer {spec.tokenizer!r}")
    config = llama.to_dict()
    config.update(
        architectures=["LlavaLlamaForCausalLM"], model_type="llava",
        mm_hidden_size=spec.clip.hidden_size, mm_projector_type=PROJECTOR_TYPE,
        mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_vision_tower=str(profile.sources.clip), dino_vision_tower=str(profile.sources.dinov2),
        image_aspect_ratio=profile.aspect, mm_use_im_start_end=False, mm_use_im_patch_token=False,
        mofserve_seeded=True,
    )
    if m.dtype != "float32":
        config["dtype"] = m.dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return llama


def _build_llava(spec: SeededSpec, profile: Profile, out: Path) -> None:
    from transformers import LlamaForCausalLM

    llama = write_llava_text_files(profile, out)
    dtype = _DTYPES[spec.llm.dtype]
    if dtype == torch.float32:  # tiny and small: HF's init, byte for byte as before (export caches)
        model = LlamaForCausalLM(llama).eval()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
    else:
        state = _drawn_llama_state(llama, dtype, spec.seed)
    for prefix, width in ((CLIP_PROJECTOR_PREFIX, spec.clip.hidden_size),
                          (DINO_PROJECTOR_PREFIX, spec.dino.hidden_size)):
        projector = Projector(width, spec.llm.hidden_size)
        for key, value in projector.state_dict().items():
            state[prefix + key] = value.to(dtype).contiguous()
    with room_for(out, tensor_bytes(state.values()), "the seeded LLaVA checkpoint"):
        _save_sharded(state, out)
