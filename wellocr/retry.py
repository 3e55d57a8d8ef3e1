"""Bounded retries for calls that cross the network (hub downloads, W&B), and only for network failures.

A missing repo or a typo is not retried: it fails at once with its own error. Offline mode is not a network
failure either (HF_HUB_OFFLINE=1 makes every hub call raise a ConnectionError subclass).
"""

from __future__ import annotations

import logging

from tenacity import before_sleep_log, retry, retry_if_exception, stop_after_attempt, wait_exponential

log = logging.getLogger("wellocr")

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


def is_transient_network_error(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled) or "OfflineModeIsEnabled" in str(exc):
        return False  # datasets re-raises offline mode as a plain ConnectionError naming it
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return status in _RETRYABLE_STATUS
    try:
        import httpx

        if isinstance(exc, httpx.TransportError):
            return True
    except ImportError:  # pragma: no cover - httpx comes with huggingface_hub
        pass
    try:
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, (ConnectionError, TimeoutError))


def network_retry(attempts: int = 5, max_wait: float = 30.0):
    """Decorator: retry transient network errors with exponential backoff, then re-raise the last one."""
    return retry(
        retry=retry_if_exception(is_transient_network_error),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=1, min=1, max=max_wait),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
