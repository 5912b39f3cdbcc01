"""Benchmarks: one script per question, each printing a markdown table and writing its figures as JSON.

Run from the repository root, e.g. `.venv/bin/python -m benchmarks.sft_throughput`. See benchmarks/README.md."""
