"""Where the platform's own log records go inside a Serve replica.

Serve gives each replica a log file, but configures only its own ``ray.serve`` logger; records
of the platform's loggers (``pacore.*``, ``deployments.*``) would reach no handler at all (and
Python's last resort prints only warnings, to a stderr nobody reads). Each deployment sends
them to its replica's file, formatted like Serve's own records, at the configured level.
"""

from __future__ import annotations

import logging

__all__ = ["PLATFORM_LOGGERS", "to_replica_log"]

PLATFORM_LOGGERS = ("pacore", "deployments")


def to_replica_log(level: str | int = "INFO") -> None:
    """Route the platform's loggers to the handlers Serve set up for this replica (nothing
    changes outside a replica, where Serve set none up)."""
    handlers = logging.getLogger("ray.serve").handlers
    if not handlers:
        return
    for name in PLATFORM_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = list(handlers)
        logger.setLevel(level)
        logger.propagate = False
