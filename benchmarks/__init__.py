"""kxops benchmark harness: `python -m benchmarks` (see benchmarks/README.md).

core.py declares what a family provides (Op, Case, Provider, Inputs); timing.py measures; runner.py
runs, prints, saves and plots; each other module (rope.py, ...) is one operator family."""
