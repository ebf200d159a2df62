"""The PA Core Python client."""
