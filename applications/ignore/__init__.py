"""Learning by ignoring: a three-level program on digits, and its two-level ablation (see docs/ignore.md)."""
