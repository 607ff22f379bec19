"""``python -m engine.profile MODEL [--batch 256] [--repeats 7]``: measured time per exit /
setting of a model on this machine (``engine.run.profile``)."""

from engine.run.profile import main

if __name__ == "__main__":
    main()
