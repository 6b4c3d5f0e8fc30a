"""Benchmarks of diffin: ground truth (loo), noise detection (noise_auroc), throughput."""
