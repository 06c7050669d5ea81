"""dit_accel: step-aware sparse attention for DiT pipelines."""
