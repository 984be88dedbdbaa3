"""Errors of the rollout package; each names the server URL, the endpoint or request, and the fix."""

from __future__ import annotations

from typing import Optional

from alp_megatron.errors import AlpError


class EngineError(AlpError):
    """An SGLang server refused, failed or could not be reached for one call.

    ``url`` is the server's base URL, ``endpoint`` the path called, ``request`` (optional) names the
    request (its id or a short description) and ``message`` is SGLang's own message or the transport error.
    """

    def __init__(self, url: str, endpoint: str, message: str, request: Optional[str] = None,
                 status: Optional[int] = None):
        self.url = url
        self.endpoint = endpoint
        self.message = message
        self.request = request
        self.status = status
        where = f"{url.rstrip('/')}{endpoint}"
        what = f" (request {request})" if request else ""
        code = f" HTTP {status}:" if status is not None else ""
        super().__init__(f"SGLang call {where}{what} failed:{code} {message}")


class EngineUnreachableError(EngineError):
    """The server did not answer (connection refused or reset, timeout): another server may serve the call."""


class MalformedResponseError(EngineError):
    """The server answered 200 with a body that breaks the response contract (e.g. ids and logprobs
    differ in length)."""


class ServerStartError(AlpError):
    """A server or router process exited or did not become healthy in time; carries its log tail."""

    def __init__(self, what: str, url: str, problem: str, log_path: Optional[str], log_tail: str):
        self.url = url
        self.log_path = log_path
        self.log_tail = log_tail
        super().__init__(
            f"{what} at {url} {problem}. Log: {log_path or '(none)'}\n"
            f"---- last lines of the log ----\n{log_tail}\n---- end of log ----"
        )
