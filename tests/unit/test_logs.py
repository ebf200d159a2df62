"""The platform's log records reach the replica's log, as Serve's own do."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from pacore.logs import PLATFORM_LOGGERS, to_replica_log


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def loggers() -> Iterator[None]:
    names = ("ray.serve", *PLATFORM_LOGGERS)
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level,
                 logging.getLogger(n).propagate) for n in names}
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers, logger.level, logger.propagate = handlers, level, propagate


def test_platform_records_go_where_serve_sends_its_own(loggers: None) -> None:
    replica_file = Collect()
    logging.getLogger("ray.serve").handlers = [replica_file]
    to_replica_log("INFO")
    logging.getLogger("pacore.orchestrator").info("route user=u provider=openai")
    logging.getLogger("deployments.router").debug("below the configured level")
    assert [r.getMessage() for r in replica_file.records] == ["route user=u provider=openai"]


def test_outside_a_replica_nothing_changes(loggers: None) -> None:
    logging.getLogger("ray.serve").handlers = []
    before = logging.getLogger("pacore").handlers[:]
    to_replica_log("DEBUG")
    assert logging.getLogger("pacore").handlers == before
