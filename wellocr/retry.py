"""Bounded retries for calls that cross the network (hub downloads, W&B), and only for network failures.

A missing repo or a typo is not retried: it fails at once with its own error. Offline mode is not a network
failure either (HF_HUB_OFFLINE=1 makes every hub call raise a ConnectionError subclass). Retries back off
exponentially within a total budget ($WELLOCR_NETWORK_RETRY_S, default 180 s); after it the caller raises
`Unreachable` (exit 69, which the managed job does not relaunch).
"""

from __future__ import annotations

import logging
import os

from tenacity import RetryCallState, retry, retry_if_exception, stop_after_delay, wait_exponential

from wellocr.errors import Unreachable

log = logging.getLogger("wellocr")

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
BUDGET_ENV = "WELLOCR_NETWORK_RETRY_S"
DEFAULT_BUDGET_S = 180.0


def retry_budget_s() -> float:
    try:
        return max(0.0, float(os.environ.get(BUDGET_ENV, DEFAULT_BUDGET_S)))
    except ValueError:
        return DEFAULT_BUDGET_S


def is_transient_network_error(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled) or "OfflineModeIsEnabled" in str(exc):
        return False  # datasets re-raises offline mode as a plain ConnectionError naming it
    if isinstance(exc, RuntimeError) and "client has been closed" in str(exc):
        return True  # huggingface_hub closed its shared client after a connection error and retried on it
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


def network_retry(max_wait: float = 30.0):
    """Decorator: retry transient network errors with exponential backoff for at most `retry_budget_s()`
    seconds, then re-raise the last one (the caller turns it into `unreachable(...)`)."""
    return retry(
        retry=retry_if_exception(is_transient_network_error),
        stop=stop_after_delay(retry_budget_s()),
        wait=wait_exponential(multiplier=1, min=1, max=max_wait),
        before_sleep=_before_sleep,
        reraise=True,
    )


def _before_sleep(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("network error (%s); retry %d in %.0f s", _first_line(exc), state.attempt_number,
                state.next_action.sleep if state.next_action else 0)
    try:  # a fresh client for the next try: huggingface_hub's shared one may have been closed by the failure
        from huggingface_hub import close_session

        close_session()
    except ImportError:  # pragma: no cover
        pass


def _first_line(exc: BaseException | None) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0] if exc is not None else "?"


def unreachable(what: str, exc: BaseException) -> Unreachable:
    """The one-line error for a service that stayed unreachable through the retries."""
    return Unreachable(f"{what}: unreachable after {retry_budget_s():.0f} s of retries ({_first_line(exc)}); "
                       "check the network, HF_ENDPOINT / proxy settings and the service's status, or use a local "
                       "copy (exit 69: the job is not relaunched for it)")
