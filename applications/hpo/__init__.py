"""Per-feature weight-decay hyperparameters learned on validation loss (see docs/hpo.md)."""
