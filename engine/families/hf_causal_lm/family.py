"""A pretrained Hugging Face causal LM (SmolLM2-135M): early exit, skipping, self-speculation."""

from __future__ import annotations

import numpy as np

from engine.core.family import Family, FamilyError, LiveRun
from engine.families.hf_causal_lm import analysis
from engine.families.hf_causal_lm import model as hf


class HFCausalLM(Family):
    name = "hf_causal_lm"
    kind = "lm"
    title = "per-token early exit (SmolLM2-135M)"
    paper = "Schuster 2022 (CALM); Elhoushi 2024 (LayerSkip); Glavas 2024 (layer selection)"
    setting = "confidence threshold"
    step_name = "layer"
    trainer = None  # pretrained: nothing of ours to train
    not_on_ray = "a language model exits per token, in generation; there are no per-sample results"
    about = (
        "A pretrained decoder read at every layer through its own final norm and head (the "
        "logit lens). Per generated token it can stop at the first confident layer (CALM), "
        "leave layers out, or draft with its first layers and verify with all of them."
    )
    setting_help = "Stop a token at the first layer whose confidence reaches this threshold."

    profile_batch = 8  # sequences decoded together (a 135M decoder at batch 256 takes minutes)

    def build(self, config: dict):
        raise FamilyError(
            "a pretrained language model is loaded from its files (Family.load), not built"
        )

    def load(self, card, progress=None) -> hf.CausalLM:
        """The card's files: ``path`` (a local folder or GGUF file), or ``gguf`` inside the
        installed data package ``source``. No weights of ours, so no SHA of ours to check.
        ``progress`` (``engine.core.progress``) hears how far the load has got."""
        c = card.config
        try:
            if "path" in c:
                return hf.load(c["path"], c.get("gguf"), progress)
            return hf.load(hf.packaged_file(c["source"], c["gguf"]), progress=progress)
        except KeyError as e:
            raise FamilyError(f"{card.model_id}: the card's config lacks {e}") from None

    def results(self, card):
        return None  # per-token exits in generation, not per-sample results

    def build_results(self, card, force: bool = False, **_):
        raise FamilyError(
            f"{card.model_id}: a pretrained language model exits per token, not per sample; "
            "the language page runs it live"
        )

    def timed(self, card, model, batch: int):
        """A KV-cached decode step per layer count, a confidence read and a K/V fill
        (``timing``): the time axis of the language page."""
        from engine.families.hf_causal_lm.timing import decode_timed

        return decode_timed(model, batch)

    def live_input(self, card) -> str:
        return "text"

    def default_setting(self, card) -> float:
        return 0.9

    def run_one(self, model: hf.CausalLM, card, x, value: float, n: int = 16) -> LiveRun:
        """``n`` greedy tokens answering the chat prompt ``x``, each stopping at the first
        layer whose max probability reaches ``value`` (CALM; the layers above are not run)."""
        g = analysis.generate(
            model, hf.chat_ids(model, str(x)), n, analysis.ExitRule("max_prob", float(value))
        )
        rows = np.asarray(g.layer_rows, dtype=np.float64)
        return LiveRun(
            prediction=-1,  # a generation, not a class
            confidence=float(np.mean(g.prob)),
            cost=float(rows.sum()),
            full_cost=float(model.n_layer * len(rows)),
            decision=f"{rows.mean():.1f} of {model.n_layer} layers per token on average",
            steps=np.asarray(g.exit_layer, dtype=np.float64),
            ran=rows > 0,
            detail={"text": model.tokenizer.decode(g.tokens), "cost_unit": "layer runs"},
        )


FAMILY = HFCausalLM()
