"""Self-hosted model engines: their configuration, the transformers engine, the vLLM config.

Heavy dependencies load lazily: importing this package pulls neither torch nor vLLM.
"""

from pacore.engines.client import EngineClient, HandleEngineClient, LocalEngineClient
from pacore.engines.config import Autoscaling, LoraAdapter, SelfHostedModel, deployment_name

__all__ = [
    "Autoscaling",
    "EngineClient",
    "HandleEngineClient",
    "LocalEngineClient",
    "LoraAdapter",
    "SelfHostedModel",
    "deployment_name",
]
