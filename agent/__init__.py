"""The on-prem agent: dials out to the cloud and serves requests with local models."""
