"""The prune stage: a keep rule over the score table, written as a retrainable manifest."""
