"""Your models: the checkpoints you brought, and a form to add a Hugging Face checkpoint that is
already on this machine (the same engine function as ``python -m engine.byo hf``)."""

from __future__ import annotations

import polars as pl
import streamlit as st

from app import loaders, navigation, progress
from engine.byo import ByoError
from engine.byo import hf as byo_hf
from engine.registry import RegistryError

DONE = "aie.my_models.done"  # the last model added, shown once after the rerun

navigation.require_router()
st.title("Your models")
st.caption(
    "Models you brought sit beside the bundled ones in every model picker and survive "
    "restarts. Here you can add a Hugging Face checkpoint that is already on this machine by "
    "typing its path: nothing is uploaded or downloaded, and pickled weights are refused."
)
st.info(
    "A PyTorch model in your own Python file is added only from the command line "
    "(`python -m engine.byo torch --help`), never from the browser: loading it runs its code.",
    icon=":material/terminal:",
)

if st.session_state.get(DONE):
    st.success(st.session_state.pop(DONE))

rows = byo_hf.user_models()
if rows:
    st.dataframe(
        pl.DataFrame(
            {
                "id": [r.model_id for r in rows],
                "kind": [r.kind for r in rows],
                "data": [r.data for r in rows],
                "metrics": [r.metrics for r in rows],
                "files": [r.files for r in rows],
            }
        ),
        hide_index=True,
        width="stretch",
    )
else:
    st.caption("You have not added a model yet.")

st.subheader("Add a Hugging Face checkpoint on disk")
with st.form("byo.hf"):
    path = st.text_input(
        "Model folder or GGUF file",
        placeholder="/home/me/models/my-bert",
        help="A folder with config.json, *.safetensors and the tokenizer, or a .gguf file.",
    )
    name = st.text_input("Name in the app", placeholder="my_bert", help="lower-case id")
    data = st.text_input(
        "Data file",
        placeholder="/home/me/data/reviews.csv",
        help="An encoder needs a CSV with a header row text,label (its exit heads are trained "
        "on it); a causal LM takes a UTF-8 .txt file (its logit lens is measured on it and a tuned "
        "lens is trained on it, with its last fifth held out to compare the two).",
    )
    c1, c2 = st.columns(2)
    joint = c1.checkbox("Fine-tune the encoder with its exits (slower)")
    overwrite = c2.checkbox("Replace my model of the same name")
    submitted = st.form_submit_button("Add the model", type="primary")

if submitted:
    path, name, data = path.strip(), name.strip(), data.strip()
    csv = data if data.lower().endswith(".csv") else None
    text = data if data and csv is None else None
    if not path:
        st.error("Type the path of a model folder or a GGUF file.")
    elif not name:
        st.error("Give the model a name (lower-case letters, digits, '_', '-' or '.').")
    else:
        problem = None
        with st.status(f"Adding {name}…", expanded=True) as status:
            bar = progress.PageBar("checking the checkpoint")
            try:
                card = byo_hf.add_checkpoint(
                    path,
                    name,
                    csv=csv,
                    text=text,
                    joint=joint,
                    overwrite=overwrite,
                    report=bar.report,
                )
            except (ByoError, RegistryError) as e:
                # the engine speaks in the command line's terms; the form's box is its --overwrite
                problem = f"{e}.".replace(
                    "pass --overwrite", "tick “Replace my model of the same name”"
                )
            except Exception as e:  # noqa: BLE001 - the page shows one sentence, never a trace
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                problem = f"Adding the model failed: {first}."
            if problem is not None:
                status.update(label=f"{name} was not added", state="error", expanded=False)
        if problem is not None:
            st.error(problem)  # outside the collapsed status box, so it is always in view
        else:
            status.update(label=f"{name} added", state="complete")
            loaders.forget_model(card.model_id)
            st.session_state[DONE] = (
                f"Added {card.model_id}. Command line equivalent: `{card.raw['training_command']}`"
            )
            st.rerun()
