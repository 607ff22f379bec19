"""A user's Hugging Face encoder (BERT-like) with an exit head after every layer."""
