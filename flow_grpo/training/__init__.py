"""Training: the GRPO step, one epoch's samples, the trainer loop, its saved state, compilation and the memory preflight."""
