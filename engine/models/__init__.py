"""The model zoo: one file per model family, each exposing ``build(config: dict) -> nn.Module``."""
