"""Async HTTP client of a set of SGLang servers (or a router in front of them): token ids in, token ids
and per-token logprobs out.

``generate``/``generate_batch`` send ``/generate`` to the least-loaded reachable URL and retry on
another one when a server does not answer or fails with a 5xx; a 4xx is the request's own fault and
raises at once, naming the request. Every answer is validated (:func:`parse_completion`): a body
whose ids, logprobs or weight-version spans disagree raises :class:`MalformedResponseError` rather
than becoming a silent sample. Control calls (pause, continue, abort, flush) go to every *worker* URL,
since ``sglang-router`` does not proxy them.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import aiohttp
import numpy as np

from alp_megatron.errors import ConfigError
from alp_megatron.rollout.engine_control import PAUSE_MODES
from alp_megatron.rollout.errors import EngineError, EngineUnreachableError, MalformedResponseError
from alp_megatron.rollout.types import Completion, WeightSpan

logger = logging.getLogger(__name__)


KEEPALIVE_S = 4.0
"""Idle connections are dropped after this long: before SGLang's server closes them (5 s,
``SGLANG_TIMEOUT_KEEP_ALIVE``), which would otherwise fail the next request sent on one (``Server disconnected``,
seen at the start of every rollout that followed more than 5 s of idling) and mark the server down."""


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to send requests.

    ``urls`` receive ``/generate`` (workers, or one router); ``control_urls`` receive pause, continue,
    abort and flush (default: ``urls``; give the worker URLs when ``urls`` is a router). ``vocab_size``
    enables the check of prompt ids before sending (SGLang 0.5.23 crashes its scheduler on an id outside
    the vocabulary); see :func:`model_vocab_size`. ``max_attempts`` counts tries of one request across
    servers; a server that failed is avoided for ``cooldown_s``. ``routed_experts``: (decoder layers,
    experts per token, experts) of an MoE model served with ``--enable-return-routed-experts``; when set,
    every ``/generate`` asks for the routes and each answer's are decoded and checked (:func:`parse_completion`).
    ``sglang-router`` 0.3.2 parses a request into a struct without SGLang's ``return_routed_experts`` and
    ``routed_experts_start_len``, so the server never hears of them (``tests/rollout/test_routes.py``): with
    routes asked for, ``/generate`` goes to the worker URLs (``control_urls``) directly, balanced by this
    client (least requests in flight; every turn of a trajectory can still pick its server), and the router
    serves nothing.
    """

    urls: Sequence[str]
    control_urls: Sequence[str] = ()
    api_key: Optional[str] = None
    vocab_size: Optional[int] = None
    request_timeout_s: float = 3600.0
    connect_timeout_s: float = 10.0
    max_attempts: int = 4
    retry_backoff_s: float = 0.5
    cooldown_s: float = 5.0
    max_connections: int = 1024
    routed_experts: Optional[tuple[int, int, int]] = None

    def __post_init__(self):
        urls = tuple(url.rstrip("/") for url in ([self.urls] if isinstance(self.urls, str) else self.urls))
        control = tuple(url.rstrip("/") for url in ([self.control_urls] if isinstance(self.control_urls, str)
                                                    else self.control_urls))
        object.__setattr__(self, "urls", urls)
        object.__setattr__(self, "control_urls", control or urls)
        if not urls:
            raise ConfigError("client.urls", "is empty", "give the URL of at least one SGLang server or router")
        for url in urls + self.control_urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError("client.urls", f"{url!r} is not an http(s) URL", "use e.g. http://127.0.0.1:30000")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError("client.vocab_size", f"{self.vocab_size!r} is not positive",
                              "use the model's vocab_size (config.json), or None to skip the check")
        if self.max_attempts < 1:
            raise ConfigError("client.max_attempts", f"{self.max_attempts!r} < 1", "use at least 1 (default 4)")
        if self.request_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ConfigError("client.request_timeout_s", "timeouts must be positive", "use seconds, e.g. 3600")
        if self.routed_experts is not None:
            shape = tuple(self.routed_experts)
            if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
                raise ConfigError("client.routed_experts", f"{self.routed_experts!r} is not (layers, top_k, experts)",
                                  "give the model's num_hidden_layers, num_experts_per_tok and num_experts, or None")
            object.__setattr__(self, "routed_experts", shape)


def model_vocab_size(model_path: str) -> int:
    """``vocab_size`` from the ``config.json`` of an HF model folder (top level or its text config)."""
    with open(os.path.join(model_path, "config.json")) as handle:
        config = json.load(handle)
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not size:
        raise ConfigError("client.vocab_size", f"{model_path}/config.json has no vocab_size",
                          "pass vocab_size explicitly")
    return int(size)


@dataclass
class _Endpoint:
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    failures: int = 0


@dataclass
class ClientStats:
    """Counters of one client: requests sent, answered, retried (and where failures happened)."""

    attempts: int = 0
    completed: int = 0
    retries: int = 0
    failures_by_url: dict = field(default_factory=dict)


class RolloutClient:
    """Async client of SGLang ``/generate`` and the generation control endpoints (see module docstring).

    Create and use it inside one event loop; ``async with RolloutClient(config) as client: ...``.
    """

    def __init__(self, config: ClientConfig):
        self.config = config
        self.stats = ClientStats()
        urls = config.urls
        if config.routed_experts is not None and set(config.control_urls) != set(config.urls):
            logger.info("routed experts asked for: /generate goes to the %d workers directly (sglang-router drops "
                        "the request's return_routed_experts)", len(config.control_urls))
            urls = config.control_urls
        self._endpoints = [_Endpoint(url) for url in urls]
        self._out_of_service: set[str] = set()  # workers that must get no request (restarting, stale weights)
        # Set by the fleet that restarts servers: True while one is being brought back. Requests then wait for a
        # server in service, and a failure on a dying server does not use up an attempt.
        self.recovering: Optional[Callable[[], bool]] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._rid_prefix = uuid.uuid4().hex[:8]
        self._rid_counter = itertools.count()

    # ---------------------------------------------------------------------------------------------
    # lifecycle

    async def __aenter__(self) -> "RolloutClient":
        self._open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
            self._session = aiohttp.ClientSession(
                headers=headers,
                connector=aiohttp.TCPConnector(limit=self.config.max_connections, keepalive_timeout=KEEPALIVE_S),
                timeout=aiohttp.ClientTimeout(total=self.config.request_timeout_s,
                                              sock_connect=self.config.connect_timeout_s),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def new_rid(self, label: str = "r") -> str:
        """A request id unique to this client (SGLang keys abort and state by it)."""
        return f"{label}-{self._rid_prefix}-{next(self._rid_counter)}"

    def set_in_service(self, url: str, serving: bool) -> None:
        """Take worker ``url`` out of service (it gets no request: it is restarting, or holds stale weights), or
        put it back. Thread-safe enough for the fleet's supervisor thread: one set operation."""
        (self._out_of_service.discard if serving else self._out_of_service.add)(url.rstrip("/"))

    def _none_in_service(self) -> bool:
        return all(url in self._out_of_service for url in self.config.control_urls)

    async def _wait_for_service(self, label: str) -> None:
        """Wait while every worker is out of service and the fleet is bringing one back."""
        while self._none_in_service() and self.recovering is not None and self.recovering():
            await asyncio.sleep(0.2)
        if self._none_in_service():
            raise EngineUnreachableError(self.config.urls[0], "/generate", "no server is in service (each died and "
                                         "could not be brought back); see the servers' logs", request=label)

    # ---------------------------------------------------------------------------------------------
    # generation

    async def generate(self, input_ids: Sequence[int], sampling_params: dict, rid: Optional[str] = None,
                       return_logprob: bool = True, routes_start: int = 0,
                       prefer: Optional[str] = None) -> Completion:
        """One response to ``input_ids`` (with per-token logprobs unless ``return_logprob`` is False).

        ``rid`` (default: a fresh id) is the request id :meth:`abort` takes; a retry sends ``rid~attempt``.
        ``routes_start``: with ``config.routed_experts``, the routes come back from this token of
        ``input_ids`` on (a continuation asks only for what it adds; SGLang's ``routed_experts_start_len``).
        ``prefer``: the URL to send it to while that server is up (the turns of one trajectory go to one
        server, whose prefix cache holds their context), else the usual pick.
        """
        rid = rid or self.new_rid("r")
        (completion,) = await self._generate([list(map(int, input_ids))], sampling_params, return_logprob,
                                             label=rid, rid=rid, routes_start=routes_start, prefer=prefer)
        return completion

    async def generate_batch(self, prompts: Sequence[Sequence[int]], sampling_params,
                             return_logprob: bool = True, label: Optional[str] = None) -> list[Completion]:
        """One response per prompt, sent as one ``/generate`` call (retried whole on another server).

        ``sampling_params``: one dict for every prompt, or a list with one dict per prompt.

        ``label`` names the batch in errors and logs. Batched requests carry no request ids (the router
        accepts only one id per call); the server's ids are in :attr:`Completion.rid`.
        """
        prompts = [list(map(int, prompt)) for prompt in prompts]
        if not prompts:
            return []
        return await self._generate(prompts, sampling_params, return_logprob,
                                    label=label or self.new_rid("batch"), rid=None)

    async def _generate(self, prompts: list[list[int]], sampling_params, return_logprob: bool,
                        label: str, rid: Optional[str], routes_start: int = 0,
                        prefer: Optional[str] = None) -> list[Completion]:
        self._check_prompts(prompts, label)
        if not 0 <= routes_start <= min(len(prompt) for prompt in prompts):
            raise ValueError(f"{label}: routes_start {routes_start} is outside the prompt [0, {len(prompts[0])}]")
        single = len(prompts) == 1
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"{label}: {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            sampling_params = dict(sampling_params[0]) if single else [dict(p) for p in sampling_params]
        else:
            sampling_params = dict(sampling_params)
        body = {
            "input_ids": prompts[0] if single else prompts,
            "sampling_params": sampling_params,
            "return_logprob": return_logprob,
        }
        if self.config.routed_experts is not None:
            body.update(return_routed_experts=True, routed_experts_start_len=routes_start)
        tried: list[str] = []
        last_error: Optional[EngineError] = None
        attempt = -1
        while attempt + 1 < self.config.max_attempts:
            attempt += 1
            await self._wait_for_service(label)
            endpoint = self._pick(avoid=tried[-1:] if len(self._endpoints) > 1 else (), prefer=prefer)
            if rid is not None:
                body["rid"] = rid if attempt == 0 else f"{rid}~{attempt}"
            self.stats.attempts += 1
            try:
                answer = await self._post_generate(endpoint, body, label)
            except (EngineUnreachableError, _RetryableStatus) as error:
                last_error = error if isinstance(error, EngineError) else error.engine_error
                tried.append(endpoint.url)
                self._mark_down(endpoint)
                self.stats.retries += 1
                if self.recovering is not None and self.recovering():
                    attempt -= 1  # a server is being brought back: this failure does not count
                logger.warning("generate %s on %s failed (%s); retrying on another server (attempt %d of %d)",
                               label, endpoint.url, last_error.message, attempt + 2, self.config.max_attempts)
                await asyncio.sleep(self.config.retry_backoff_s * max(attempt + 1, 1))
                continue
            items = [answer] if single and isinstance(answer, dict) else answer
            if not isinstance(items, list) or len(items) != len(prompts):
                raise MalformedResponseError(endpoint.url, "/generate",
                                             f"expected {len(prompts)} answers, got {_short(answer)}", request=label)
            completions = [parse_completion(item, f"{label}[{i}]" if not single else label, endpoint.url,
                                            return_logprob, self.config.routed_experts, routes_start)
                           for i, item in enumerate(items)]
            self.stats.completed += len(completions)
            return completions
        raise EngineUnreachableError(
            last_error.url if last_error else self.config.urls[0], "/generate",
            f"no server answered after {self.config.max_attempts} attempts (tried {tried}); last error: "
            f"{last_error.message if last_error else 'none'}. Check that the servers run (their logs) "
            "or raise client.max_attempts", request=label)

    def _check_prompts(self, prompts: list[list[int]], label: str) -> None:
        vocab = self.config.vocab_size
        for index, prompt in enumerate(prompts):
            where = label if len(prompts) == 1 else f"{label}[{index}]"
            if not prompt:
                raise EngineError(self.config.urls[0], "/generate", "the prompt has no token ids", request=where)
            if vocab is not None:
                bad = [token for token in prompt if not 0 <= token < vocab]
                if bad:
                    raise EngineError(self.config.urls[0], "/generate",
                                      f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab}); "
                                      "tokenize with the served model's tokenizer", request=where)

    async def _post_generate(self, endpoint: _Endpoint, body: dict, label: str) -> Any:
        session = self._open()
        endpoint.in_flight += 1
        try:
            async with session.post(endpoint.url + "/generate", json=body) as response:
                text = await response.text()
                status = response.status
        except asyncio.TimeoutError as error:
            raise EngineUnreachableError(endpoint.url, "/generate",
                                         f"no answer within {self.config.request_timeout_s:.0f} s",
                                         request=label) from error
        except aiohttp.ClientError as error:
            raise EngineUnreachableError(endpoint.url, "/generate", f"{type(error).__name__}: {error}",
                                         request=label) from error
        finally:
            endpoint.in_flight -= 1
        payload = _json_or_text(text)
        if status >= 500:
            raise _RetryableStatus(EngineError(endpoint.url, "/generate", _error_message(payload),
                                               request=label, status=status))
        if status != 200:
            raise EngineError(endpoint.url, "/generate", _error_message(payload), request=label,
                              status=status)
        endpoint.failures = 0
        return payload

    def _pick(self, avoid: Sequence[str] = (), prefer: Optional[str] = None) -> _Endpoint:
        now = time.monotonic()
        serving = [e for e in self._endpoints if e.url not in self._out_of_service] or self._endpoints
        for endpoint in serving:
            if endpoint.url == prefer and endpoint.url not in avoid and endpoint.down_until <= now:
                return endpoint
        candidates = [e for e in serving if e.url not in avoid and e.down_until <= now]
        if not candidates:
            candidates = [e for e in serving if e.down_until <= now] or serving
            if all(e.down_until > now for e in candidates):
                return min(candidates, key=lambda e: e.down_until)
        return min(candidates, key=lambda e: e.in_flight)

    def _mark_down(self, endpoint: _Endpoint) -> None:
        endpoint.failures += 1
        endpoint.down_until = time.monotonic() + self.config.cooldown_s
        self.stats.failures_by_url[endpoint.url] = self.stats.failures_by_url.get(endpoint.url, 0) + 1

    # ---------------------------------------------------------------------------------------------
    # control (every worker)

    async def pause(self, mode: str = "abort") -> None:
        """Pause generation on every worker: ``abort`` returns running requests as aborted, ``retract``
        and ``in_place`` keep them (resumed by :meth:`resume`). New requests wait until then."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r} is not one of {PAUSE_MODES}")
        await self._control_all("/pause_generation", {"mode": mode})

    async def resume(self) -> None:
        """Continue generation on every worker after :meth:`pause`."""
        await self._control_all("/continue_generation", {})

    async def abort(self, rid: str) -> None:
        """Abort one request (its partial output comes back with finish reason ``abort``)."""
        await self._control_all("/abort_request", {"rid": rid, "abort_all": False})

    async def abort_all(self) -> None:
        """Abort every running and queued request on every worker."""
        await self._control_all("/abort_request", {"rid": "", "abort_all": True})

    async def flush_cache(self) -> None:
        """Drop every worker's prefix cache (refused by a worker with running requests)."""
        await self._control_all("/flush_cache", None)

    async def health(self, timeout_s: float = 10.0) -> dict[str, bool]:
        """Whether each worker answers ``/health`` within ``timeout_s`` (a paused worker does not)."""
        async def probe(url: str) -> bool:
            try:
                async with self._open().get(url + "/health",
                                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                    return response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return False

        results = await asyncio.gather(*(probe(url) for url in self.config.control_urls))
        return dict(zip(self.config.control_urls, results))

    async def _control_all(self, endpoint: str, body: Optional[dict]) -> None:
        """``endpoint`` on every worker in service (one out of service runs none of this client's requests)."""
        urls = [url for url in self.config.control_urls if url not in self._out_of_service]
        results = await asyncio.gather(*(self._control(url, endpoint, body) for url in urls),
                                       return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            raise errors[0]

    async def _control(self, url: str, endpoint: str, body: Optional[dict]) -> Any:
        try:
            async with self._open().post(url + endpoint, json=body,
                                         timeout=aiohttp.ClientTimeout(total=120)) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise EngineUnreachableError(url, endpoint, f"{type(error).__name__}: {error}") from error
        payload = _json_or_text(text)
        if status != 200 or (isinstance(payload, dict) and payload.get("success") is False):
            raise EngineError(url, endpoint, _error_message(payload), status=status)
        return payload


class _RetryableStatus(Exception):
    def __init__(self, engine_error: EngineError):
        super().__init__(str(engine_error))
        self.engine_error = engine_error


# -------------------------------------------------------------------------------------------------
# response validation


def parse_completion(item: Any, label: str, url: str, with_logprobs: bool = True,
                     routed_experts: Optional[tuple[int, int, int]] = None, routes_start: int = 0) -> Completion:
    """Validate one ``/generate`` answer (``label`` names the request in errors) and return it as a
    :class:`Completion` whose ``rid`` is the server's request id.

    Raises :class:`MalformedResponseError` when: the answer is not an object with ``output_ids`` and
    ``meta_info``; ids are not integers; ``finish_reason`` is missing or unknown; logprobs were requested
    and their count or token ids differ from ``output_ids`` or a logprob is NaN or positive; the
    weight-version spans do not tile ``[0, len(output_ids))``; routes were asked for (``routed_experts``:
    layers, top_k, experts) and are missing (a router that drops the field), not base64 int32, not one row
    per input token from ``routes_start`` (``prompt_tokens + len(output_ids) - 1 - routes_start`` rows), or
    name an expert outside ``[0, experts)``. The routes are kept in the smallest integer type that holds
    every expert id (uint8 up to 256 experts): 32k tokens x 48 layers x top-8 is 12 MB a sample, not 49.
    """
    def bad(problem: str) -> MalformedResponseError:
        return MalformedResponseError(url, "/generate", problem, request=label)

    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise bad(f"answer is not an object with meta_info: {_short(item)}")
    meta = item["meta_info"]
    output_ids = item.get("output_ids")
    if not isinstance(output_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                   for t in output_ids):
        raise bad(f"output_ids is not a list of integers: {_short(output_ids)}")
    count = len(output_ids)
    if meta.get("completion_tokens", count) != count:
        raise bad(f"completion_tokens={meta.get('completion_tokens')} but {count} output_ids")

    finish = meta.get("finish_reason")
    finish_type = finish.get("type") if isinstance(finish, dict) else finish
    if finish_type not in ("stop", "length", "abort"):
        raise bad(f"finish_reason {_short(finish)} is not stop, length or abort")
    if finish_type == "abort" and isinstance(finish, dict) and finish.get("status_code") not in (None, 200):
        # The server refused the request (it answers 200 for each item of a batch it partly refused).
        raise EngineError(url, "/generate", str(finish.get("message", finish)), request=label,
                          status=finish.get("status_code"))

    logprobs: list[float] = []
    if with_logprobs:
        entries = meta.get("output_token_logprobs")
        if not isinstance(entries, list) or len(entries) != count:
            raise bad(f"{len(entries) if isinstance(entries, list) else entries!r} output_token_logprobs "
                      f"for {count} output_ids")
        for position, (entry, token) in enumerate(zip(entries, output_ids)):
            if not isinstance(entry, (list, tuple)) or len(entry) < 2:
                raise bad(f"output_token_logprobs[{position}] is {_short(entry)}, not [logprob, id, text]")
            logprob, entry_token = entry[0], entry[1]
            if entry_token != token:
                raise bad(f"output_token_logprobs[{position}] is for token {entry_token}, "
                          f"output_ids[{position}] is {token}")
            if not isinstance(logprob, (int, float)) or math.isnan(logprob) or logprob > 1e-6:
                raise bad(f"output_token_logprobs[{position}] has logprob {logprob!r}")
            logprobs.append(float(logprob))

    version = meta.get("weight_version")
    if not isinstance(version, str):
        raise bad(f"weight_version is {_short(version)}")
    spans = _weight_spans(meta.get("weight_versions"), version, count, bad)
    prompt_tokens = int(meta.get("prompt_tokens", 0))
    routes = None
    if routed_experts is not None:
        routes = _routes(meta.get("routed_experts"), routed_experts, prompt_tokens + count - 1 - routes_start, bad)
    return Completion(
        rid=str(meta.get("id") or label), url=url, output_ids=tuple(output_ids), output_logprobs=tuple(logprobs),
        finish_reason=finish_type, weight_version=version, weight_spans=spans, prompt_tokens=prompt_tokens,
        matched_stop=finish.get("matched") if isinstance(finish, dict) else None,
        routed_experts=routes, routes_start=routes_start,
    )


def _routes(raw: Any, shape: tuple[int, int, int], rows: int, bad) -> np.ndarray:
    """SGLang's ``meta_info.routed_experts`` (base64 of little-endian int32) as ``[rows, layers, top_k]``."""
    layers, top_k, experts = shape
    rows = max(rows, 0)
    if not isinstance(raw, str):
        raise bad(f"routed_experts is {_short(raw)}: the server was not started with "
                  "--enable-return-routed-experts, or a router in front dropped the field")
    try:
        flat = np.frombuffer(base64.b64decode(raw, validate=True), dtype="<i4")
    except (ValueError, TypeError) as error:
        raise bad(f"routed_experts is not base64 of int32 values ({error})") from None
    if flat.size != rows * layers * top_k:
        raise bad(f"routed_experts holds {flat.size} values, not {rows} input tokens x {layers} layers x "
                  f"{top_k} experts")
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= experts):
        raise bad(f"routed_experts names experts {int(flat.min())}..{int(flat.max())}, outside [0, {experts})")
    return flat.reshape(rows, layers, top_k).astype(route_dtype(experts))


def route_dtype(experts: int) -> np.dtype:
    """The smallest integer type that holds every expert id of a model with ``experts`` experts."""
    return np.dtype(np.uint8 if experts <= 256 else np.int16 if experts <= 2**15 else np.int32)


def _weight_spans(raw: Any, version: str, count: int, bad) -> tuple[WeightSpan, ...]:
    if raw is None or (raw == [] and count == 0):
        return (WeightSpan(version, 0, count),) if count else ()
    if not isinstance(raw, list):
        raise bad(f"weight_versions is {_short(raw)}")
    spans = []
    position = 0
    for entry in raw:
        try:
            span = WeightSpan(str(entry["version"]), int(entry["start"]), int(entry["end"]))
        except (TypeError, KeyError, ValueError):
            raise bad(f"weight_versions entry {_short(entry)} is not {{version, start, end}}") from None
        if span.start != position or span.end < span.start:
            raise bad(f"weight_versions {_short(raw)} do not tile the {count} output tokens")
        if span.end > span.start:
            spans.append(span)
        position = span.end
    if position != count:
        raise bad(f"weight_versions {_short(raw)} cover {position} of {count} output tokens")
    return tuple(spans)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def _error_message(payload: Any) -> str:
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if payload.get(key):
                return str(payload[key])
    return _short(payload)


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
