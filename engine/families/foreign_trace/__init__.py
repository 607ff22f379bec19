"""Per-token exit traces from another tool (``python -m engine.byo trace``)."""
