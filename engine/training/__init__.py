"""One trainer per model family; ``engine.train`` dispatches to them by name."""
