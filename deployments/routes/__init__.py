"""HTTP routes of the gateway, one module per API area; the logic lives behind the handles."""
