"""Files a user would bring, made in the test (no download): a tiny random BERT classifier
with its WordPiece tokenizer, a tiny Llama with a word-level tokenizer, a labelled CSV whose
label is a keyword, and a text file."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

WORDS = (
    "the a movie film plot actor scene story music ending day night city car road food "
    "dinner book page idea time people friend home work trip weather phone screen game"
).split()
GOOD, BAD = "wonderful", "terrible"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _fast_tokenizer(vocab: dict[str, int], wordpiece: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if wordpiece:
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    else:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if wordpiece:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def vocab() -> dict[str, int]:
    words = SPECIALS + sorted(set(WORDS) | {GOOD, BAD, ".", ","})
    return {w: i for i, w in enumerate(words)}


def tiny_bert(
    folder: Path, layers: int = 3, seed: int = 0, num_labels: int = 2, id2label: dict | None = None
) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    v = vocab()
    cfg = BertConfig(
        vocab_size=len(v),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        **(
            {"id2label": id2label, "label2id": {b: a for a, b in id2label.items()}}
            if id2label
            else {}
        ),
    )
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    _fast_tokenizer(v, wordpiece=True).save_pretrained(folder)
    return folder


def tiny_llama(folder: Path, layers: int = 3, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    v = vocab()
    cfg = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(v),
    )
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    _fast_tokenizer(v, wordpiece=False).save_pretrained(folder)
    return folder


def keyword_csv(path: Path, n: int = 200, seed: int = 0, labels=("negative", "positive")) -> Path:
    """n rows of random words; the label is which keyword the text holds."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            y = i % 2
            words = [rng.choice(WORDS) for _ in range(rng.randrange(4, 10))]
            words.insert(rng.randrange(len(words) + 1), GOOD if y else BAD)
            w.writerow([" ".join(words), labels[y]])
    return path


def text_file(path: Path, n_words: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n")
    return path


def pattern_text(path: Path, n_patterns: int = 40, repeats: int = 4, seed: int = 0) -> Path:
    """Text a tuned lens can learn from: random six-word patterns, each repeated (a random
    model's later layers predict a repeat better than its early ones, in a learnable way)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_patterns):
        pat = [rng.choice(WORDS) for _ in range(6)]
        lines.append(" ".join(pat * repeats))
    path.write_text("\n".join(lines) + "\n")
    return path
