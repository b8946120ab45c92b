"""Models used by the tests, examples and benchmarks."""
