"""The language page in a real browser, on the real SmolLM2-135M: type a message, generate, and
see the answer's tokens coloured by the layer each one exited after."""

from __future__ import annotations

import os

import pytest

from engine.families.hf_causal_lm import model as M
from tests.conftest import serve


def need_model():
    try:
        M.packaged_file(M.SMOLLM2_SOURCE, M.SMOLLM2_GGUF)
    except M.LoadError as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (CI is set, so this is not skipped)")
        pytest.skip(str(e))


def test_typing_a_prompt_and_generating_shows_tokens_coloured_by_exit_layer(browser, tmp_path):
    need_model()
    with serve(tmp_path, env={"AIE_LM_CARD": ""}) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        page.goto(f"{base}/language", timeout=60_000)
        tab = page.get_by_role("tab", name="SmolLM2-135M, pretrained")
        tab.wait_for(timeout=60_000)
        assert tab.get_attribute("aria-selected") == "true"  # the default tab
        box = page.get_by_label("Your message (the model's chat template is added)")
        box.fill("What is the capital of France?")
        box.press("Control+Enter")  # commit the text before the click
        page.get_by_role("button", name="Generate").click()
        tokens = page.locator("span.aie-tok")
        tokens.first.wait_for(timeout=240_000)  # the first load: ~25 s on a quiet machine
        n = tokens.count()
        assert n >= 8
        layers = {tokens.nth(i).get_attribute("data-layer") for i in range(n)}
        colours = set(
            page.eval_on_selector_all(
                "span.aie-tok", "els => els.map(e => getComputedStyle(e).borderBottomColor)"
            )
        )
        assert len(layers) > 1 and len(colours) == len(layers)  # one colour per exit layer
        assert "exit after layer" in tokens.first.get_attribute("title")  # hover: layer
        page.get_by_text("Every layer's guess, for every token").wait_for()
        if os.environ.get("AIE_SHOTS_DIR"):  # a screenshot for a person to look at
            page.screenshot(
                path=os.path.join(os.environ["AIE_SHOTS_DIR"], "language_smollm2.png"),
                full_page=True,
            )
