"""Reusable Streamlit parts: figure builders (pure data -> figure), cached loaders, widgets."""
