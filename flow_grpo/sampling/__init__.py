"""Sampling: the training rollouts (SDE window, lockstep TP-GRPO), ODE generation and evaluation."""
