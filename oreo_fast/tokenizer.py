"""The embedded tokenizer, built locally with the ``tokenizers`` library.

A byte-level BPE (so any text round-trips exactly) whose pre-tokenizer isolates every digit
and every newline: digits come one per token (a tiny model learns arithmetic digit by digit)
and no token ever straddles a newline (reasoning steps end at newlines). The merges are
learned from the task's own text, so words such as ``Multiply`` become single tokens.
Saved as a Hugging Face tokenizer folder that ``AutoTokenizer.from_pretrained`` loads.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from oreo_fast.errors import DataError, ModelDirError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

# Pieces no merge may cross: a newline, a single digit, a word with its leading space,
# a run of other symbols with its leading space, or a run of spaces.
_SPLIT = Regex(r"\n| ?[0-9]| ?[A-Za-z]+| ?[^\sA-Za-z0-9]+| +|\s")


def build_tokenizer(texts: Iterable[str], vocab_size: int = 384):
    """Train the byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(_SPLIT, behavior="isolated"),
        # maps bytes to printable characters; use_regex=False keeps our own split above
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False, padding_side="left")


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """Load any local HF tokenizer folder; a pad token is ensured (EOS when missing) and
    padding is on the left, as batched generation needs."""
    from transformers import AutoTokenizer

    check_tokenizer_dir(path)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def check_tokenizer_dir(path) -> Path:
    """A folder holding tokenizer files, or a :class:`ModelDirError` naming it."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError("tokenizer folder does not exist", path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)})", path)
    return path


def tokenizer_signature(folder) -> tuple | None:
    """(sorted vocabulary, (eos, bos, pad) ids) of a folder's tokenizer; None if it ships none."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return loaded_tokenizer_signature(load_tokenizer(folder))


def loaded_tokenizer_signature(tok) -> tuple:
    """What two tokenizers must share to encode alike: the vocabulary and special ids."""
    return tuple(sorted(tok.get_vocab().items())), (tok.eos_token_id, tok.bos_token_id,
                                                     tok.pad_token_id)


def encode_pair(tokenizer, prompt: str, response: str | None = None,
                add_eos: bool = True) -> tuple[list[int], int]:
    """Token ids of ``prompt`` followed by ``response`` (and EOS), and the prompt length.

    Prompt and response are encoded separately so the prompt/response boundary is always a
    token boundary; every consumer (SFT, sampling, the OREO trainer) must use this function
    so that ids agree.
    """
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    ids = list(prompt_ids)
    if response is not None:
        ids += tokenizer.encode(response, add_special_tokens=False)
        if add_eos:
            ids.append(tokenizer.eos_token_id)
    return ids, len(prompt_ids)


def drop_long(items: list, lengths: list[int], max_length: int, what: str, strict: bool,
              source: str | None = None) -> tuple[list, int]:
    """Keep the items whose token length fits ``max_length``. The others are dropped with one
    counted warning, or, under ``strict``, the first one raises a DataError naming it."""
    kept = [item for item, n in zip(items, lengths) if n <= max_length]
    dropped = len(items) - len(kept)
    if dropped:
        if strict:
            first = next(i for i, n in enumerate(lengths) if n > max_length)
            raise DataError(f"{what} {first} is {lengths[first]} tokens, over the maximum "
                            f"length {max_length} (--strict)", source)
        logging.getLogger("oreo_fast").warning(
            "dropped %d of %d %ss longer than %d tokens%s", dropped, len(items), what,
            max_length, f" in {source}" if source else "")
    return kept, dropped
