"""Quiet calls to the Hugging Face hub: the callers report a failure themselves, as one line."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub logs every retry against an unreachable hub as a warning (six lines before an error);
    silence them while a download is tried."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
