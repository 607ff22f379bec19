"""Router only: every page lives in pages/, every number comes from engine/."""

from pathlib import Path

import streamlit as st

from app import navigation

ROOT = Path(__file__).resolve().parent
# (file, title, icon) in navigation order; the first existing one is where a newcomer lands.
PAGES = [
    ("pages/tour.py", "Guided tour", ":material/school:"),
    ("pages/tuning.py", "Threshold tuning", ":material/tune:"),
    ("pages/inspector.py", "Sample inspector", ":material/search:"),
    ("pages/skipping.py", "Layer skipping", ":material/fast_forward:"),
    ("pages/halting.py", "Halting (adaptive computation)", ":material/timer:"),
    ("pages/routing.py", "Mixture of experts", ":material/hub:"),
    ("pages/language.py", "Early-exit language model", ":material/text_fields:"),
    ("pages/compare.py", "Compare methods", ":material/compare_arrows:"),
    ("pages/precision.py", "Exit or continue in int8 (QuEE)", ":material/memory:"),
    ("pages/my_models.py", "Your models", ":material/upload_file:"),
]

# a file shipped in assets/: a ":material/..." page icon makes the browser fetch it from a font host
FAVICON = ROOT / "assets" / "favicon.png"

st.set_page_config(page_title="Adaptive Inference Explorer", page_icon=FAVICON, layout="wide")
pages = [st.Page(f, title=t, icon=i) for f, t, i in PAGES if (ROOT / f).exists()]
page = st.navigation(pages)
navigation.opened(page.url_path)
page.run()
