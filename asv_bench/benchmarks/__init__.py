"""asv benchmarks of tierkv's hot paths; see docs/benchmarks.md for how to run them and the numbers."""
