"""Few-shot learning on the 8x8 digits with MAML, iMAML and first-order MAML (``python -m applications.maml``)."""
