"""Data loaders for sets that ship inside registry packages (no downloads at run time)."""
