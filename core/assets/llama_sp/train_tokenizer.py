"""Trains the LLaMA-style SentencePiece ``tokenizer.model`` beside this script (run once, committed).

Why: the ``paper-shaped`` profile must feed its LM exactly the ids a LLaVA-1.5 checkpoint's
tokenizer would, and those come from a SentencePiece BPE model with LLaMA's settings (byte
fallback, a dummy prefix "▁" before each encoded text, split digits, ids 0/1/2 = <unk> <s> </s>,
no pad, identity normalisation, whitespace kept). LLaMA's own model cannot be downloaded here, so
one with the same settings is trained offline on English text this machine has: the docstrings of
the Python standard library, the licences in /usr/share/common-licenses and MMVP-style questions.
The vocabulary is as large as that corpus supports, up to LLaMA's 32000 (``hard_vocab_limit``
off). One thread and no shuffling keep the training deterministic for a given corpus; the
committed ``tokenizer.model`` is the source of truth (the corpus differs across machines).

    .venv/bin/python core/assets/llama_sp/train_tokenizer.py
"""

from __future__ import annotations

import ast
import io
import sysconfig
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
LICENCES = Path("/usr/share/common-licenses")

# LLaVA's llava_v1 template and MMVP-style questions (digits, punctuation, non-ASCII included).
QUESTIONS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions. USER: <image>",
    "Is the elderly person standing or sitting in the picture? (a) Standing (b) Sitting ASSISTANT:",
    "Is the dog facing left or right from the camera's perspective? (a) Left (b) Right",
    "Are the butterfly's wings closer to being open or closed? (a) Open (b) Closed",
    "How many eyes can you see in the image? (a) One (b) Two",
    "Is there a shadow on the flower? (a) Yes (b) No",
    "What color is the text on the sign? (a) Red (b) Blue",
    "Are there any words displayed on the vehicle's lightbar? (a) Yes (b) No",
    "In the image, is the flame of the match more towards the left or right? (a) Left (b) Right",
    "Is the door of the truck open or closed? (a) Open (b) Closed",
    "How many wheels does the 18-wheeler show: 4, 6 or 18? (a) 4 (b) 6 (c) 18",
    "Does the café's menu list crème brûlée for €4.50? (a) Yes (b) No",
    "Is the clock showing 10:10 or 3:45? (a) 10:10 (b) 3:45",
    "Where is the snowman — on the left or the right of the tree? (a) Left (b) Right",
]


def _docstrings() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield from doc.splitlines()


def _licences() -> Iterator[str]:
    for path in sorted(p for p in LICENCES.rglob("*") if p.is_file() and not p.is_symlink()):
        yield from path.read_text(encoding="utf-8", errors="ignore").splitlines()


def corpus() -> list[str]:
    """Non-empty lines, in a fixed order (SentencePiece reads one sentence per line)."""
    return [line for line in [*QUESTIONS, *_licences(), *_docstrings()] if line.strip()]


def train(out: Path = HERE / "tokenizer.model", vocab_size: int = 32000) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        character_coverage=0.99995, byte_fallback=True, split_digits=True,
        split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
        max_sentencepiece_length=16, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        unk_surface=" \u2047 ", num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    out.write_bytes(model.getvalue())
    return out


if __name__ == "__main__":
    import sentencepiece as spm

    path = train()
    sp = spm.SentencePieceProcessor(model_file=str(path))
    print(f"{path}: {sp.get_piece_size()} pieces, {path.stat().st_size} bytes")
