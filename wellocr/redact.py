"""Keep credentials out of everything wellocr writes: logs, saved configs, run.json, W&B config.

Secrets reach wellocr only as environment variables (SkyPilot `--secret`); their values are masked wherever
text is written, so a key pasted into a config value or echoed by a library still never lands on disk.
"""

from __future__ import annotations

import os

SECRET_ENV_VARS = (
    "WANDB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "RUNPOD_API_KEY",
)
MASK = "***"
_MIN_SECRET_LENGTH = 6  # shorter values would mask ordinary words and digits


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    values = {env.get(name, "") for name in SECRET_ENV_VARS}
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str, env: dict[str, str] | None = None) -> str:
    for value in secret_values(env):
        text = text.replace(value, MASK)
    return text


def redact_data(data, env: dict[str, str] | None = None):
    """A copy of nested dicts/lists with every string redacted (for YAML/JSON written to disk or W&B)."""
    if isinstance(data, str):
        return redact(data, env)
    if isinstance(data, dict):
        return {k: redact_data(v, env) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_data(v, env) for v in data]
    return data
