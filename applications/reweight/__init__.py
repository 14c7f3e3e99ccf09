"""Meta-Weight-Net data reweighting on long-tailed, label-noised digits (see docs/reweight.md)."""
