"""On-prem agents, cloud side: the wire protocol shared with the agent, the hub, the bus."""
