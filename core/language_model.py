"""The language model: loading it from a LLaVA-format checkpoint and answering with visual tokens.

``load_language_model`` reads the LLaMA part of a LLaVA checkpoint (``config.json`` holds LLaMA
fields plus ``mm_*`` keys under ``model_type: llava``; weights in safetensors or
``pytorch_model*.bin``, sharded or not) into a plain ``LlamaForCausalLM``. The vision towers and
projectors stored beside it (``model.vision_tower.*``, ``model.dino_tower.*``,
``model.mm_projector.*``, ``model.dino_mm_projector.*``) are skipped quietly: the projectors run
in ``fuse_<mode>`` (core.fusion), the towers are the exported encoders.

``VisualLanguageModel`` answers one question about one image given its visual tokens ``[N, H]``
(from ``fuse_<mode>``): it builds the llava_v1 prompt (core.conversation), tokenises the text
before and after ``<image>`` as LLaVA's ``tokenizer_image_token`` does (the tokenizer's own BOS
on the first chunk, none on the second), splices ``embed(prefix) + visual tokens +
embed(suffix)`` as ``inputs_embeds`` and calls ``generate`` (greedy unless a temperature is
given). With options it also scores each option label ("(a) Standing") as the assistant's
continuation, by its mean log-probability per token (see ``score_options``), and picks the
best, so a multiple-choice question always gets a well-formed letter whatever the text says.
The prompt's forward pass runs once (``prefill``); scoring and generation continue from its
KV cache.

``answer`` is the one-sequence reference path (transformers' ``generate``); the server runs
requests through ``core.llm_engine.LLMEngine``, which batches decode steps across sequences in
flight and reuses this class's prompt building, prefill, option scoring and validation, so the
two give the same tokens (tests/unit/test_llm_engine.py).

An earlier version answered one sequence at a time on the grounds that the prefill dominates on
CPU. Measured on the paper's LM width (FACTS.md: hidden 4096, bf16, 2 vCPUs) the decode step is
bandwidth-bound: 82 ms for 1 sequence, 166 ms for 8, so batching decode gives ~4x the tokens/s;
what stays true is that prefill is compute-bound, so the engine prefills each sequence alone.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoints import quiet_transformers, read_config
from .conversation import Option, build_prompt, clean_answer, parse_options, split_prompt
from .errors import FieldError
from .fusion import ADDITIVE_PROJECTOR_PREFIX, CLIP_PROJECTOR_PREFIX, DINO_PROJECTOR_PREFIX

LOGGER = logging.getLogger(__name__)

#: Keys of a LLaVA checkpoint that are not the language model (skipped without a word).
NON_LM_PREFIXES = (CLIP_PROJECTOR_PREFIX, DINO_PROJECTOR_PREFIX, ADDITIVE_PROJECTOR_PREFIX,
                   "model.vision_tower.", "model.dino_tower.")
# LLaVA-1.5 checkpoints saved by older transformers still carry the rotary buffers.
_STALE_SUFFIXES = (".rotary_emb.inv_freq",)
# config.json keys that describe the multimodal wrapper, not the LLaMA inside it
_NOT_LLAMA = ("model_type", "architectures", "auto_map", "dtype", "torch_dtype", "_name_or_path",
              "transformers_version")

DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_LIMIT = 512
MAX_TEMPERATURE = 2.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llama_config(llava_path: Path | str):
    """A ``LlamaConfig`` from a LLaVA ``config.json`` (its LLaMA fields; ``mm_*`` keys dropped)."""
    from transformers import LlamaConfig

    config = read_config(Path(llava_path))
    fields = {k: v for k, v in config.items()
              if k not in _NOT_LLAMA and not k.startswith(("mm_", "dino_", "mofserve_"))}
    return LlamaConfig(**fields)


def load_language_model(llava_path: Path | str, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu"):
    """``(LlamaForCausalLM, tokenizer)`` from a LLaVA-format folder; raises if LM weights are missing."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(llava_path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    quiet_transformers()
    model, info = LlamaForCausalLM.from_pretrained(path, config=llama_config(path), dtype=dtype,
                                                   output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"llava: {path} lacks {len(missing)} language-model weights (e.g. {missing[:3]}); "
                         "is it a LLaVA checkpoint with its LLaMA weights?")
    unknown = sorted(k for k in info["unexpected_keys"]
                     if not k.startswith(NON_LM_PREFIXES) and not k.endswith(_STALE_SUFFIXES))
    if unknown:
        LOGGER.warning("llava: %d weights of %s are neither the LM nor a known vision part, ignored: %s",
                       len(unknown), path, unknown[:5])
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


# ---- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Generation settings of one request; temperature 0 is greedy decoding."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Prompt:
    """A prompt split around its image: token ids before and after the visual tokens."""

    text: str
    prefix_ids: list[int]
    suffix_ids: list[int]
    suffix_text: str

    def length(self, visual_tokens: int) -> int:
        return len(self.prefix_ids) + visual_tokens + len(self.suffix_ids)


@dataclass(frozen=True)
class Answer:
    text: str
    chosen_option: str = ""  # the best-scored option's letter; "" without options
    option_scores: tuple[float, ...] = ()  # mean log-probability per token, in option order
    options: tuple[Option, ...] = ()
    prompt_tokens: int = 0  # text and visual tokens fed to the LM
    generated_tokens: int = 0
    token_ids: list[int] = field(default_factory=list, repr=False)


class VisualLanguageModel:
    """A LLaMA LM answering questions about an image from its visual tokens (see module doc)."""

    def __init__(self, model, tokenizer, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT) -> None:
        if not 1 <= default_max_new_tokens <= max_new_tokens_limit:
            raise FieldError("max_new_tokens", f"default {default_max_new_tokens} must be within "
                             f"[1, {max_new_tokens_limit}]")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.default_max_new_tokens = default_max_new_tokens
        self.max_new_tokens_limit = max_new_tokens_limit
        self.hidden_size = int(model.config.hidden_size)
        self.context_length = int(model.config.max_position_embeddings)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # transformers renamed the cache argument (past_key_values -> cache); accept both
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def from_checkpoint(cls, llava_path: Path | str, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", **limits: int) -> VisualLanguageModel:
        model, tokenizer = load_language_model(llava_path, dtype=dtype, device=device)
        return cls(model, tokenizer, **limits)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ---- validation ---------------------------------------------------------------------------

    def sampling(self, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None) -> Sampling:
        """Validated settings; None takes the default. Errors name the field and its limit."""
        limit = self.max_new_tokens_limit
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens
        if isinstance(max_new_tokens, float) or not 1 <= int(max_new_tokens) <= limit:
            raise FieldError("max_new_tokens", f"must be an integer within [1, {limit}], got {max_new_tokens}")
        temperature = 0.0 if temperature is None else float(temperature)
        if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
            raise FieldError("temperature", f"must be within [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {temperature}")
        top_p = 1.0 if top_p is None else float(top_p)
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise FieldError("top_p", f"must be within (0, 1], got {top_p}")
        if seed is not None and not 0 <= int(seed) < 2**63:
            raise FieldError("seed", f"must be within [0, 2^63), got {seed}")
        return Sampling(int(max_new_tokens), temperature, top_p, None if seed is None else int(seed))

    def _visual(self, visual_tokens) -> torch.Tensor:
        if torch.is_tensor(visual_tokens):
            tokens = visual_tokens
        else:
            array = np.asarray(visual_tokens)
            tokens = torch.from_numpy(array if array.flags.writeable else array.copy())
        if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] != self.hidden_size:
            raise FieldError("visual_tokens", f"expected [N, {self.hidden_size}] (N >= 1), got {list(tokens.shape)}")
        if not torch.is_floating_point(tokens) or not bool(torch.isfinite(tokens).all()):
            raise FieldError("visual_tokens", "expected finite floating-point values")
        return tokens.to(device=self.device, dtype=self.dtype)

    # ---- prompt ---------------------------------------------------------------------------------

    def encode_prompt(self, question: str, options: str | None = None) -> Prompt:
        """Token ids of the llava_v1 prompt around ``<image>`` (LLaVA's ``tokenizer_image_token``)."""
        text = build_prompt(question, options)
        before, after = split_prompt(text)
        prefix = list(self.tokenizer(before).input_ids)  # with the tokenizer's BOS, if it adds one
        suffix = list(self.tokenizer(after, add_special_tokens=False).input_ids)
        return Prompt(text, prefix, suffix, after)

    @torch.inference_mode()
    def inputs_embeds(self, visual_tokens, prompt: Prompt) -> tuple[torch.Tensor, int]:
        """``[1, L, H]`` = embed(prefix) + visual tokens + embed(suffix), and where the tokens start."""
        visual = self._visual(visual_tokens)
        embed = self.model.get_input_embeddings()
        ids = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        parts = [embed(ids(prompt.prefix_ids)), visual, embed(ids(prompt.suffix_ids))]
        return torch.cat(parts).unsqueeze(0), len(prompt.prefix_ids)

    def check_room(self, prompt: Prompt, visual: int, max_new_tokens: int) -> None:
        length, context = prompt.length(visual), self.context_length
        if length >= context:
            raise FieldError("question", f"the prompt is {length} tokens ({visual} of them visual), over the "
                             f"model's context of {context} tokens")
        if length + max_new_tokens > context:
            raise FieldError("max_new_tokens", f"must be at most {context - length} for this prompt ({length} "
                             f"tokens of a {context}-token context), got {max_new_tokens}")

    # ---- generation and scoring -------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor):
        """The KV cache of all but the last prompt position: generation and option scoring both
        continue from it, so the prompt (mostly visual tokens) runs once per question."""
        out = self.model(inputs_embeds=embeds[:, :-1], use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    @torch.inference_mode()
    def generate(self, embeds: torch.Tensor, sampling: Sampling, cache=None) -> list[int]:
        """New token ids after ``embeds`` ``[1, L, H]`` (EOS and what follows dropped). ``cache``
        (from ``prefill``, consumed) saves the prompt's forward pass; the ids are the same."""
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                      pad_token_id=self.pad_token_id, num_beams=1)
        if cache is not None:
            kwargs[self.cache_arg] = cache
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:  # nucleus sampling only: top_k 0 turns off a checkpoint's default top-k
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.seed is None or sampling.greedy:
            output = self.model.generate(**kwargs)
        else:
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the caller's RNG state is left as it was
                torch.manual_seed(sampling.seed)
                output = self.model.generate(**kwargs)
        ids = output[0].tolist()  # only new tokens: generate was given embeddings, not ids
        eos = self.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) - {None}
        for i, token in enumerate(ids):
            if token in stops:
                return ids[:i]
        return ids

    def continuation_ids(self, prompt: Prompt, option: Option) -> list[int]:
        """Tokens of ``" " + option.label`` as they follow "ASSISTANT:" (llava_v1 writes
        ``role + ": " + message``). Encoded together with the prompt's end and split off, so that
        merges across the boundary are the ones the model saw; standalone if they do not line up."""
        whole = self.tokenizer(prompt.suffix_text + " " + option.label, add_special_tokens=False).input_ids
        n = len(prompt.suffix_ids)
        if len(whole) > n and list(whole[:n]) == prompt.suffix_ids:
            return list(whole[n:])
        return list(self.tokenizer(" " + option.label, add_special_tokens=False).input_ids)

    @torch.inference_mode()
    def score_options(self, embeds: torch.Tensor, prompt: Prompt, options: Sequence[Option],
                      cache=None) -> list[float]:
        """Mean log-probability per token of each option label as the assistant's reply.

        Each option runs as [last prompt position + its tokens] on a copy of the prompt's cache
        (``prefill``; ``cache`` is left as it was, for ``generate``): a few positions per option
        instead of the whole prompt again. The mean, not the sum, so that an option with more
        tokens is not penalised for its length.
        """
        if cache is None:
            cache = self.prefill(embeds)
        embed = self.model.get_input_embeddings()
        scores = []
        for option in options:
            ids = self.continuation_ids(prompt, option)
            tail = embed(torch.tensor(ids[:-1], dtype=torch.long, device=self.device)).unsqueeze(0)
            inputs = torch.cat([embeds[:, -1:], tail], dim=1)  # position j predicts ids[j]
            logits = self.model(inputs_embeds=inputs, **{self.cache_arg: copy.deepcopy(cache)}).logits
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
            scores.append(float(logprobs[torch.arange(len(ids)), torch.tensor(ids)].mean()))
        return scores

    def prepare(self, visual_tokens, question: str, options: str | None,
                sampling: Sampling) -> tuple[Prompt, torch.Tensor, list[Option]]:
        """The prompt, its ``[1, L, H]`` embeddings and the parsed options of one request, checked to
        fit the context with its token limit (and its longest option): what every path runs first."""
        parsed = parse_options(options) if options is not None and options.strip() else []
        prompt = self.encode_prompt(question, options)
        embeds, _ = self.inputs_embeds(visual_tokens, prompt)
        visual = embeds.shape[1] - len(prompt.prefix_ids) - len(prompt.suffix_ids)
        longest_option = max((len(self.continuation_ids(prompt, o)) for o in parsed), default=0)
        self.check_room(prompt, visual, max(sampling.max_new_tokens, longest_option))
        return prompt, embeds, parsed

    def answer(self, visual_tokens, question: str, options: str | None = None, *,
               max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None) -> Answer:
        """Generate an answer and, with options, the best-scored option's letter."""
        sampling = self.sampling(max_new_tokens, temperature, top_p, seed)
        prompt, embeds, parsed = self.prepare(visual_tokens, question, options, sampling)
        cache = self.prefill(embeds)
        scores = self.score_options(embeds, prompt, parsed, cache) if parsed else []
        ids = self.generate(embeds, sampling, cache)
        text = clean_answer(self.tokenizer.decode(ids, skip_special_tokens=True))
        chosen = parsed[int(np.argmax(scores))].letter if parsed else ""
        return Answer(text, chosen, tuple(scores), tuple(parsed), embeds.shape[1], len(ids), ids)
