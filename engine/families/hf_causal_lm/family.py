"""A pretrained Hugging Face causal LM (SmolLM2-135M): early exit, skipping, self-speculation."""

from __future__ import annotations

from engine.core.family import Family, FamilyError
from engine.families.hf_causal_lm import model as hf


class HFCausalLM(Family):
    name = "hf_causal_lm"
    kind = "lm"
    title = "per-token early exit (SmolLM2-135M)"
    paper = "Schuster 2022 (CALM); Elhoushi 2024 (LayerSkip); Glavas 2024 (layer selection)"
    setting = "confidence threshold"
    step_name = "layer"
    trainer = None  # pretrained: nothing of ours to train
    about = (
        "A pretrained decoder read at every layer through its own final norm and head (the "
        "logit lens). Per generated token it can stop at the first confident layer (CALM), "
        "leave layers out, or draft with its first layers and verify with all of them."
    )
    setting_help = "Stop a token at the first layer whose confidence reaches this threshold."

    def build(self, config: dict):
        raise FamilyError(
            "a pretrained language model is loaded from its files (Family.load), not built"
        )

    def load(self, card) -> hf.CausalLM:
        """The card's files: ``path`` (a local folder or GGUF file), or ``gguf`` inside the
        installed data package ``source``. No weights of ours, so no SHA of ours to check."""
        c = card.config
        try:
            if "path" in c:
                return hf.load(c["path"], c.get("gguf"))
            return hf.load(hf.packaged_file(c["source"], c["gguf"]))
        except KeyError as e:
            raise FamilyError(f"{card.model_id}: the card's config lacks {e}") from None

    def results(self, card):
        return None  # per-token exits in generation, not per-sample results

    def build_results(self, card, force: bool = False, **_):
        raise FamilyError(
            f"{card.model_id}: a pretrained language model exits per token, not per sample; "
            "the language page runs it live"
        )

    def live_input(self, card) -> str:
        return "text"

    def default_setting(self, card) -> float:
        return 0.9


FAMILY = HFCausalLM()
