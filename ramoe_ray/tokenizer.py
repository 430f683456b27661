"""A small byte-level BPE tokenizer trained locally (no hub), loadable with ``AutoTokenizer``.

Special tokens have fixed ids, the ones the project's tiny models use: ``<pad>`` 0, ``<s>`` 1 (bos),
``</s>`` 2 (eos), ``<unk>`` 3 (never produced: byte-level BPE covers every byte). Encoding adds no
special token (as the OLMoE and Qwen tokenizers): callers add bos/eos where they want them.
Padding is on the right by default (``padding_side="right"``), the usual side for training and
log-likelihood scoring; a generation stage that batches prompts sets ``padding_side = "left"``
on its own copy.

Training is deterministic: the same texts give byte-identical files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# Byte-level BPE needs its 256 byte symbols plus the special tokens before any merge.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Trains byte-level BPE on ``texts``, saves it to ``out_dir`` (save_pretrained) and returns it."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} is too small; byte-level BPE needs at least {MIN_VOCAB}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no (non-empty) texts")

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),  # ids 0, 1, 2, 3 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS.values()):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **SPECIAL_TOKENS)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf
