"""Fixtures of the reader tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def reader_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Captures the readers' notes even after the CLI has stopped ``capattn`` logs from propagating."""
    logger = logging.getLogger("capattn.data.readers")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # caplog's handler also sits on the root logger: each note once
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate
