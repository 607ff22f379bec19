"""A user's encoder on raw texts, for the language page's classifier tab: the same answers,
in the same shapes, as ``engine.families.multi_exit_bert.analysis`` gives for the MiniLM.

- ``classify``: every exit's probabilities for each text (``run_exits``, the trace's function).
- ``token_attributions``: Captum Layer Integrated Gradients on the word embeddings for one exit.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.families.hf_encoder.model import encode
from engine.families.hf_encoder.model import exit_names as exit_names
from engine.families.multi_exit_bert.analysis import Classified
from engine.run.exits import run_exits
from engine.run.inspection import embedding_attributions


@torch.no_grad()
def classify(model, texts: list[str]) -> Classified:
    x = encode(model.tokenizer, list(texts), model.config.seq_length)
    probs, _ = run_exits(model, x)
    return Classified(list(texts), probs, x[:, 1].sum(1).numpy().astype(np.int64))


def token_attributions(model, text: str, exit_k: int, target: int | None = None, steps: int = 32):
    """(word pieces, attribution per piece, target class, convergence delta) for exit k.

    The baseline replaces every piece but the first and last (the special tokens) by the pad
    token; the padding after the text is left out, so every score belongs to a real piece.
    """
    tok = model.tokenizer
    x = encode(tok, [text], model.config.seq_length)
    n = int(x[0, 1].sum())
    ids, mask = x[:, 0, :n].long(), x[:, 1, :n]
    pieces = tok.convert_ids_to_tokens(ids[0].tolist())

    def exit_logits(input_ids, attention_mask):
        h = torch.stack([input_ids.float(), attention_mask.expand_as(input_ids)], dim=1)
        for stage in model.stages[: exit_k + 1]:
            h = stage(h)
        return model.heads[exit_k](h)

    scores, target, delta = embedding_attributions(
        exit_logits,
        model.word_embeddings,
        ids,
        mask,
        tok.pad_token_id if tok.pad_token_id is not None else 0,
        target,
        steps,
    )
    return pieces, scores, target, delta
