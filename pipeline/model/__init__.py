"""Model layer: the open_clip factory and the CLIP losses. Knows nothing about Ray or the CLI."""
