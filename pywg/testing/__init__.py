"""Test beds and helpers for the tests, the demo and the benchmarks (never imported by product code)."""
