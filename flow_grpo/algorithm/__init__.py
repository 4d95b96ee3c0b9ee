"""The algorithm core: stochastic steps with log-probs, TP-GRPO step rewards, advantages and the GRPO loss.

Pure tensor functions; nothing here imports the rest of the package."""
