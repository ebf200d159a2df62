"""Benchmarks of PA Core against a direct call, a bare Ray Serve chain and LiteLLM Proxy."""
