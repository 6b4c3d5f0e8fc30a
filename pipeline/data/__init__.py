"""Data layer: shard patterns, safe tar reading, tar writing, the generated pool.

Knows nothing about models, Ray or the CLI.
"""
