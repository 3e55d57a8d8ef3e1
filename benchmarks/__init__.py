"""Benchmarks of wellocr on a GPU (lab tooling, not part of the installed package): `python benchmarks/bench.py`."""
