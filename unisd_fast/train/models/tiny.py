"""A tokenizer and a small causal LM built locally from a config: nothing is downloaded.

``build_tokenizer()`` is character level over printable ASCII and newline, with
``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>`` special tokens. ``build_tiny_model`` creates a
randomly initialised Qwen2- or Llama-style causal LM sized for CPU tests and demos.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
MARKER = "unisd_tiny_tokenizer"
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
ARCHITECTURES = {"qwen2": Qwen2Config, "llama": LlamaConfig}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer; unknown characters map to ``<unk>``.

    No special token is added on encoding; padding is on the left (for generation). Saved
    with a marker that :func:`load_tokenizer` reads back.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.init_kwargs[MARKER] = True
    return tokenizer


def load_tokenizer(path: str):
    """AutoTokenizer, except for a folder saved from :func:`build_tokenizer`: transformers
    maps a qwen2 model folder to Qwen2Tokenizer, whose pre-tokenizer drops characters of the
    tiny vocabulary (the newline), so such a folder loads as the plain fast tokenizer."""
    config = Path(path) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get(MARKER):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def build_tiny_model(
    tokenizer,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    attn_implementation: str = "sdpa",
):
    """A small randomly initialised causal LM whose vocabulary matches ``tokenizer``.

    The global torch RNG is left untouched: initialisation runs under a forked RNG seeded
    with ``seed``, so the same arguments give the same weights.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = ARCHITECTURES[arch](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
