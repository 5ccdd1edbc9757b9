"""The experiments that reproduce the paper (reproduce.py), the GPU run (gpu_check.py), and their
results (results/, bench_results/, RESULTS.md). Run from the repository root: python -m experiments.reproduce."""
