"""A tiny random-initialised Llama with a byte-level tokenizer and a chat template, saved as a
model folder with a card, so the language page's tests need no 25 s load of the real model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

N_LAYER = 4
CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def save_tiny_lm(folder: Path) -> Path:
    """The model folder and, beside it, ``tiny_lm.json``: a card for it. Returns the card."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / "tiny_lm"
    cfg = LlamaConfig(
        num_hidden_layers=N_LAYER,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT).save_pretrained(model_dir)
    card = folder / "tiny_lm.json"
    card.write_text(
        json.dumps(
            {
                "model_id": "tiny_lm",
                "title": "A tiny random Llama (tests)",
                "family": "hf_causal_lm",
                "module": "engine.families.hf_causal_lm.model",
                "config": {"path": str(model_dir)},
                "dataset": "bbc_news",
            }
        )
    )
    return card
