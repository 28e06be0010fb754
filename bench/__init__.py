"""Benchmarks of Pype against its peers (see the README)."""
