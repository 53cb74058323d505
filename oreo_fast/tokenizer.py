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

from oreo_fast.errors import ConfigError, DataError, ModelDirError
from oreo_fast.tasks.problems import format_prompt

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


PROMPT_FORMATS = ("auto", "plain", "chat")


def resolve_prompt_format(tokenizer, prompt_format: str = "auto") -> str:
    """``plain`` or ``chat``: ``auto`` is ``chat`` when the tokenizer has a chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "plain"
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"prompt_format: must be one of {PROMPT_FORMATS} (got {prompt_format!r})")
    if prompt_format == "chat" and not has_template:
        raise ConfigError("prompt_format: 'chat' needs a tokenizer with a chat template "
                          "(tokenizer_config.json 'chat_template'); use 'plain'")
    return prompt_format


def render_prompt(tokenizer, question: str, prompt_format: str = "auto",
                  system_prompt: str | None = None) -> str:
    """THE prompt text of a question, for every job (SFT, sampling, eval, search).

    ``plain``: ``Question: ...\nAnswer:\n`` (oreo_fast.tasks.PROMPT_TEMPLATE), after the
    system prompt and a blank line when one is given. ``chat``: the tokenizer's own template
    over ``[system?, user]`` with the generation prompt (the assistant header) appended.
    """
    if resolve_prompt_format(tokenizer, prompt_format) == "plain":
        text = format_prompt(question)
        return f"{system_prompt.strip()}\n\n{text}" if system_prompt else text
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question.strip()})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The ids the tokenizer itself gives ``prompt``: ``tokenizer(prompt)``, so a BOS added by
    the post-processor (Llama 3, SentencePiece models) or by ``add_bos_token`` is kept. A text
    that already begins with the BOS token (a chat template that writes it) gets no second
    one, and an EOS appended by the post-processor is removed (a prompt does not end there)."""
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    if bos and prompt.startswith(bos):
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    ids = list(tokenizer(prompt)["input_ids"])
    if eos and ids and ids[-1] == tokenizer.eos_token_id and not prompt.endswith(eos):
        ids.pop()
    return ids


_MARK = "\u2063OREO_MARK\u2063"  # a placeholder no template writes by itself


def _rendered_after(tokenizer, role: str) -> tuple[str, str]:
    """The template's text between an assistant turn's content and a ``role`` turn's content,
    and the text after the latter (with the generation prompt for a non-assistant role)."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                {"role": role, "content": _MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=role != "assistant")
    except Exception as e:  # the template's own check (roles, alternation)
        raise DataError(f"the chat template cannot render a {role!r} turn after an assistant "
                        f"turn: {e}") from None
    cut = text.rindex(_MARK)
    start = text.rindex("y", 0, cut) + 1
    return text[start:cut], text[cut + len(_MARK):]


def turn_end_id(tokenizer, prompt_format: str = "auto") -> int:
    """The EOS a trajectory ends with: for ``chat``, the special token the template closes an
    assistant turn with (``<|im_end|>``, ``<|eot_id|>``); else the tokenizer's EOS."""
    if resolve_prompt_format(tokenizer, prompt_format) == "chat":
        found = template_turn_end_id(tokenizer)
        if found is not None:
            return found
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos_token: set one in tokenizer_config.json")
    return tokenizer.eos_token_id


def template_turn_end_id(tokenizer) -> int | None:
    """The special token right after an assistant turn's content in the chat template, or
    None (no template, or plain text follows the content)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}],
        tokenize=False)
    after = text[text.rindex(_MARK) + len(_MARK):]
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else None


def chat_markup(tokenizer, role: str) -> tuple[str, str]:
    """The template's markup around a ``role`` turn that follows an assistant turn, without
    the assistant's turn end (an action of its own): (text before the content, text after
    it). After a non-assistant turn the text ends with the next assistant header."""
    before, after = _rendered_after(tokenizer, role)
    end = template_turn_end_id(tokenizer)
    if end is not None:
        end_text = tokenizer.convert_ids_to_tokens(end)
        if before.startswith(end_text):
            before = before[len(end_text):]
    return before, after


def encode_pair(tokenizer, prompt: str, response: str | None = None,
                add_eos: bool = True, eos_id: int | None = None) -> tuple[list[int], int]:
    """Token ids of ``prompt`` followed by ``response`` (and EOS), and the prompt length.

    The prompt is encoded as the tokenizer encodes it (:func:`encode_prompt`, BOS included),
    the response separately without special tokens, so the prompt/response boundary is
    always a token boundary; every consumer (SFT, sampling, the OREO trainer) uses this
    function so that ids agree. ``eos_id`` (default: the tokenizer's EOS) ends the response;
    pass :func:`turn_end_id` for chat prompts.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    ids = list(prompt_ids)
    if response is not None:
        ids += tokenizer.encode(response, add_special_tokens=False)
        if add_eos:
            ids.append(tokenizer.eos_token_id if eos_id is None else eos_id)
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
