"""Who may pin, and how much: the server's pin policy (``--polykv-pin``, ``--polykv-pin-quota``).

- ``off``: no request may pin (unpinning is always allowed).
- ``any``: any request may pin its tenant's documents.
- ``token``: a pin request must carry ``polykv.pin_token`` equal to the secret the server was
  started with, read from the environment variable :data:`PIN_TOKEN_ENV` (an environment variable
  rather than a flag, so the secret is neither in the process list nor in the engine's logged
  configuration).

In every mode a tenant (a ``cache_salt``; no salt is a tenant of its own) pins at most
``quota_bytes`` of compressed blocks.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from polykv_vllm.connector.config import PIN_TOKEN_ENV, PinMode, PolyKVConfig
from polykv_vllm.connector.scheduler.params import DocParams

__all__ = ["PinPolicy"]


@dataclass(frozen=True)
class PinPolicy:
    """``mode`` (off/any/token), the per-tenant ``quota_bytes``, and the ``token`` (token mode
    only; excluded from repr so it is never logged)."""

    mode: PinMode
    quota_bytes: int
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(
        cls, config: PolyKVConfig, environ: Mapping[str, str] | None = None
    ) -> PinPolicy:
        """The policy of ``config``; raises ``ValueError`` for ``pin="token"`` without a secret."""
        env = os.environ if environ is None else environ
        token = None
        if config.pin == "token":
            token = env.get(PIN_TOKEN_ENV) or None
            if token is None:
                raise ValueError(
                    f"polykv option pin='token' needs the pin secret in the environment variable "
                    f"{PIN_TOKEN_ENV}, which is unset or empty: start the server with "
                    f"{PIN_TOKEN_ENV}=<secret>, or choose pin='any' or pin='off'."
                )
        return cls(mode=config.pin, quota_bytes=config.pin_quota_bytes(), token=token)

    def refusal(self, params: DocParams) -> str | None:
        """Why this request may not pin, or None when it may."""
        if self.mode == "off":
            return "policy: pinning is off on this server (--polykv-pin off)"
        if self.mode == "token":
            given = params.pin_token
            if given is None:
                return "policy: pinning needs the server's pin token (polykv.pin_token)"
            assert self.token is not None
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return "policy: wrong pin token"
        return None
