"""Experiments: sweep files, the runner that executes every combination, and reports."""
