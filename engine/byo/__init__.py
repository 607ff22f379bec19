"""Bring your own model: a user's Hugging Face checkpoint, PyTorch model file or foreign trace,
added to the user model folder (``engine.paths.user_models_dir``) from the command line
(``python -m engine.byo --help``)."""


class ByoError(RuntimeError):
    """A user's input that cannot be used; the message is one sentence naming the problem."""
