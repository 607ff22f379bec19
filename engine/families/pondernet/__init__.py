"""PonderNet (Banino et al. 2021): probabilistic halting with a geometric prior; see model.py."""
