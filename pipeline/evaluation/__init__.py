"""Evaluation of the scorers: metrics and the leave-one-out ground truth (METHOD.md section 7)."""
