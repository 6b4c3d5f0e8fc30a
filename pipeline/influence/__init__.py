"""Numerical layer: the functions of theta that Diff-In differentiates, and the estimators.

Knows about torch and open_clip models, nothing about shards, Ray or the CLI.
"""
