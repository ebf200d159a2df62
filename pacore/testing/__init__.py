"""Loopback servers that speak upstream wire protocols, for tests, benchmarks and demos."""
