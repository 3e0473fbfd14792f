"""Tokenizers: offline loading of a checkpoint's tokenizer, batch tokenization, and built-in
byte-level tokenizers for the tiny model presets.

* :func:`load_tokenizer` loads ``<checkpoint>/tokenizer`` (CLIP; PixArt's T5; SANA's Gemma) or
  ``<checkpoint>/tokenizer_2`` (FLUX's T5) with transformers' ``AutoTokenizer`` and
  ``local_files_only=True`` (no hub access).
* :func:`tokenize` pads and truncates to a fixed length, as the diffusers pipelines do, and
  logs (absl) the part of each prompt that truncation removed.
* :func:`byte_level_t5_tokenizer` / :func:`byte_level_clip_tokenizer` /
  :func:`byte_level_gemma_tokenizer` are deterministic in-memory
  ``transformers.PreTrainedTokenizerFast`` objects whose vocabulary is every UTF-8
  byte plus the special tokens each model needs. They stand in for the real (hub-only)
  vocabularies in tests and tiny pipelines, and ``save_pretrained`` / :func:`load_tokenizer`
  round-trip them.

  ===========  ==========================================  ============================
  tokenizer    ids                                         encoding of text ``s``
  ===========  ==========================================  ============================
  T5           ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2,       ``[b + 3 for b in utf8(s)]``
               byte b -> ``b + 3`` (259 ids)               ``+ [1]``
  CLIP         byte b -> ``b``, ``<|startoftext|>`` 256,   ``[256] + list(utf8(s))``
               ``<|endoftext|>`` 257 (258 ids; eos = pad)  ``+ [257]``
  Gemma        ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,      ``[2] + [b + 4 for b in``
               ``<unk>`` 3, byte b -> ``b + 4`` (260 ids)  ``utf8(s)]``
  ===========  ==========================================  ============================

  The CLIP end token has the largest id, as in the real CLIP vocabulary, so both pooling rules
  of ``clip.CLIPTextModel`` find it.

transformers is imported lazily: importing its ``AutoTokenizer`` also imports torch when torch
is installed, and the package must not pull torch in at import time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from absl import logging

from svdquant_jax.utils.safetensors_io import CheckpointError

if TYPE_CHECKING:
  import transformers

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_BYTE_OFFSET = 3
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_BOS_ID, CLIP_EOS_ID = 256, 257
GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK = "<pad>", "<eos>", "<bos>", "<unk>"
GEMMA_BYTE_OFFSET = 4


def load_tokenizer(folder: str | os.PathLike) -> Any:
  """Loads a transformers tokenizer from a local folder (``tokenizer/``, ``tokenizer_2/``, ...).

  Raises:
    CheckpointError: if the folder does not exist or holds no loadable tokenizer (the
      underlying reason is included in the message).
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise CheckpointError(f"tokenizer folder not found: {folder}")
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  try:
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)
  except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as e:
    raise CheckpointError(f"{folder}: cannot load a tokenizer from this folder: "
                          f"{type(e).__name__}: {e}") from e


def tokenize(tokenizer: Any, prompts: str | Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes prompts to a fixed length (pad to, and truncate at, ``max_length``).

  Special tokens are added as the tokenizer defines them (T5: ``</s>`` at the end; CLIP:
  start and end tokens); truncation keeps them and drops content tokens. For every prompt
  longer than ``max_length`` tokens an absl warning names the prompt index and the decoded
  text that was dropped.

  Args:
    tokenizer: a transformers tokenizer with a pad token.
    prompts: one prompt or a non-empty sequence of prompts.
    max_length: output length; must leave room for at least one content token.

  Returns:
    ``(input_ids, attention_mask)``, both ``int32 [B, max_length]`` numpy arrays; the mask is
    1 for tokens (special tokens included) and 0 for padding.

  Raises:
    ValueError: empty ``prompts``, a non-string prompt, a bad ``max_length`` or a tokenizer
      without a pad token.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = list(prompts)
  if not prompts:
    raise ValueError("prompts is empty; pass at least one prompt (an empty string is a valid prompt)")
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str):
      raise ValueError(f"prompts[{i}] is a {type(prompt).__name__}, expected str")
  num_special = tokenizer.num_special_tokens_to_add(pair=False)
  if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length <= num_special:
    raise ValueError(f"max_length must be an integer > {num_special} (the special tokens this tokenizer adds), "
                     f"got {max_length!r}")
  if tokenizer.pad_token is None:
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token; cannot pad to max_length")
  max_length = int(max_length)
  encoded = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                      return_attention_mask=True, verbose=False)
  input_ids = np.asarray(encoded["input_ids"], dtype=np.int32)
  attention_mask = np.asarray(encoded["attention_mask"], dtype=np.int32)
  if input_ids.shape != (len(prompts), max_length) or attention_mask.shape != input_ids.shape:
    raise ValueError(f"tokenizer {type(tokenizer).__name__} returned shape {input_ids.shape}, expected "
                     f"{(len(prompts), max_length)}")
  _warn_truncated(tokenizer, prompts, max_length, num_special)
  return input_ids, attention_mask


def _warn_truncated(tokenizer: Any, prompts: list[str], max_length: int, num_special: int) -> None:
  content = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
  keep = max_length - num_special
  for i, ids in enumerate(content):
    if len(ids) <= keep:
      continue
    if getattr(tokenizer, "truncation_side", "right") == "left":
      removed = ids[:len(ids) - keep]
    else:
      removed = ids[keep:]
    logging.warning("prompt %d has %d tokens, more than max_length=%d; this part was truncated: %r",
                    i, len(ids) + num_special, max_length, tokenizer.decode(removed))


# ----------------------------------------------------------------------------- built-in
def _byte_to_unicode() -> dict[int, str]:
  """A reversible map of the 256 byte values to printable characters (GPT-2 byte level).

  Printable Latin-1 characters stand for themselves; the remaining bytes (controls, space,
  soft hyphen, ...) take the characters ``chr(256 + n)`` in byte order. The ``tokenizers``
  ``ByteLevel`` pre-tokenizer uses this same map.
  """
  printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
      set(range(ord("®"), ord("ÿ") + 1))
  mapping, extra = {}, 0
  for b in range(256):
    if b in printable:
      mapping[b] = chr(b)
    else:
      mapping[b] = chr(256 + extra)
      extra += 1
  return mapping


def _byte_level_tokenizer(vocab: dict[str, int], specials: list[str], template: str,
                          unk_token: str) -> Any:
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
  # No merges: every byte of the input becomes exactly one token.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(specials)
  tok.post_processor = processors.TemplateProcessing(
      single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
  return tok


def byte_level_t5_tokenizer(model_max_length: int = 512) -> "transformers.PreTrainedTokenizerFast":
  """T5-style byte-level tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, byte b -> b + 3; appends ``</s>``."""
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  vocab = {T5_PAD: 0, T5_EOS: 1, T5_UNK: 2}
  vocab.update({char: b + T5_BYTE_OFFSET for b, char in _byte_to_unicode().items()})
  tok = _byte_level_tokenizer(vocab, [T5_PAD, T5_EOS, T5_UNK], f"$A {T5_EOS}", T5_UNK)
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=T5_PAD, eos_token=T5_EOS, unk_token=T5_UNK,
                                 model_max_length=model_max_length, padding_side="right",
                                 truncation_side="right")


def byte_level_clip_tokenizer(model_max_length: int = 77) -> "transformers.PreTrainedTokenizerFast":
  """CLIP-style byte-level tokenizer: byte b -> b, ``<|startoftext|>`` 256, ``<|endoftext|>`` 257
  (also the pad token); wraps each text in start and end tokens."""
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  vocab = {char: b for b, char in _byte_to_unicode().items()}
  vocab.update({CLIP_BOS: CLIP_BOS_ID, CLIP_EOS: CLIP_EOS_ID})
  tok = _byte_level_tokenizer(vocab, [CLIP_BOS, CLIP_EOS], f"{CLIP_BOS} $A {CLIP_EOS}", CLIP_EOS)
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS,
                                 unk_token=CLIP_EOS, model_max_length=model_max_length, padding_side="right",
                                 truncation_side="right")


def byte_level_gemma_tokenizer(model_max_length: int = 8192) -> "transformers.PreTrainedTokenizerFast":
  """Gemma-style byte-level tokenizer: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, byte b -> b + 4;
  prepends ``<bos>`` (as Gemma's tokenizer), pads on the right."""
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  vocab = {GEMMA_PAD: 0, GEMMA_EOS: 1, GEMMA_BOS: 2, GEMMA_UNK: 3}
  vocab.update({char: b + GEMMA_BYTE_OFFSET for b, char in _byte_to_unicode().items()})
  tok = _byte_level_tokenizer(vocab, [GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK], f"{GEMMA_BOS} $A", GEMMA_UNK)
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=GEMMA_PAD, eos_token=GEMMA_EOS, bos_token=GEMMA_BOS,
                                 unk_token=GEMMA_UNK, model_max_length=model_max_length, padding_side="right",
                                 truncation_side="right")
