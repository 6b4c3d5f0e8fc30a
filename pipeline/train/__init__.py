"""Proxy training: the trajectory whose checkpoints Diff-In differentiates."""
