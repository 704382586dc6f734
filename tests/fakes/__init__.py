"""Fakes that stand in for real backends and GPUs in tests."""
