"""PA Core: provider-agnostic LLM orchestration on Ray Serve."""

__version__ = "0.1.0"
