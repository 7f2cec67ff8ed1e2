"""CLIP text input: the checkpoint's own tokenizer, padded and truncated to the text context.

One function shared by the Triton ``tokenize_text`` model, the export parity check of the
``clip_text`` graph and the tests, so that they all feed the text tower the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

CONTEXT_LENGTH = 77  # CLIP's text context: <|startoftext|>, up to 75 tokens, <|endoftext|>


def load_clip_tokenizer(path: Path | str):
    """The tokenizer saved in a CLIP checkpoint folder (``openai/clip-vit-large-patch14-336`` ships
    one; the seeded profiles train one offline, see ``core.seeded``)."""
    from transformers import AutoTokenizer

    from .checkpoints import quiet_transformers  # lazy: checkpoints imports torch; tokenize_text runs without it

    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as error:
        raise FileNotFoundError(f"clip: no usable CLIP tokenizer in {path} ({error}); the CLIP checkpoint folder "
                                "must hold its tokenizer (tokenizer.json, or vocab.json + merges.txt)") from None


def tokenize(tokenizer, texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """int64 ``[n, context_length]``: ``<|startoftext|> tokens <|endoftext|>`` then padding (the
    tokenizer's pad token, ``<|endoftext|>`` for CLIP); a longer text keeps its first
    ``context_length - 2`` tokens and still ends with ``<|endoftext|>`` (OpenAI's ``truncate=True``)."""
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=context_length,
                        return_attention_mask=False)
    return np.asarray(encoded["input_ids"], dtype=np.int64).reshape(len(texts), context_length)
