"""Synchronous control calls to one SGLang server, one method per HTTP endpoint (SGLang 0.5.23).

Used by the trainer side (weight bridge, pause/continue around updates, health). Control calls go to
each server's own URL: ``sglang-router`` does not proxy the weight and pause endpoints. Every failure
(no connection, a non-200 answer, ``success: false``) raises :class:`EngineError` naming the URL, the
endpoint and SGLang's message.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import requests

from alp_megatron.rollout.errors import EngineError, EngineUnreachableError

PAUSE_MODES = ("abort", "retract", "in_place")


class EngineControl:
    """Control client of the SGLang server at ``url``; ``api_key`` is sent as a Bearer token when set."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout_s: float = 300.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "EngineControl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------
    # status

    def health(self) -> bool:
        """``GET /health``: True when the server answers a one-token generation; raises otherwise."""
        self._call("GET", "/health")
        return True

    def model_info(self) -> dict:
        """``GET /model_info``: model path, weight version, architectures and other serving facts."""
        return self._call("GET", "/model_info")

    def server_info(self) -> dict:
        """``GET /server_info``: the server's resolved launch arguments (``tp_size``, ...) and scheduler facts."""
        return self._call("GET", "/server_info")

    def weight_version(self) -> str:
        """The label of the weights the server serves now (from ``/model_info``)."""
        info = self.model_info()
        if "weight_version" not in info:
            raise EngineError(self.url, "/model_info", f"answer has no weight_version: {info}")
        return info["weight_version"]

    def flush_cache(self) -> None:
        """``POST /flush_cache``: drop the prefix cache (refused while requests run or are queued)."""
        self._call("POST", "/flush_cache")

    # ---------------------------------------------------------------------------------------------
    # generation flow

    def pause_generation(self, mode: str = "abort") -> None:
        """``POST /pause_generation``: ``abort`` returns running requests as aborted, ``retract`` queues them
        again (KV cache recomputed), ``in_place`` keeps them and their KV cache (no cache flush until continue)."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r} is not one of {PAUSE_MODES}")
        self._call("POST", "/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        """``POST /continue_generation``: resume after :meth:`pause_generation`."""
        self._call("POST", "/continue_generation", {})

    def abort_request(self, rid: Optional[str] = None, abort_all: bool = False) -> None:
        """``POST /abort_request``: the request ``rid`` (or every request) returns its partial output as aborted."""
        if rid is None and not abort_all:
            raise ValueError("abort_request needs a request id or abort_all=True")
        self._call("POST", "/abort_request", {"rid": rid or "", "abort_all": abort_all})

    def slow_down(self, forward_sleep_s: Optional[float]) -> None:
        """``POST /slow_down``: sleep this long before every forward batch (None or 0: full speed). For tests
        that must catch requests mid-generation."""
        self._call("POST", "/slow_down", {"forward_sleep_time": forward_sleep_s})

    # ---------------------------------------------------------------------------------------------
    # weights

    def begin_weight_update(self, selector: str = "all") -> None:
        """``POST /begin_weight_update``: open the session that tensor and distributed updates require."""
        self._call("POST", "/begin_weight_update", {"selector": selector})

    def end_weight_update(self) -> None:
        """``POST /end_weight_update``: close the session and finalize the loaded weights."""
        self._call("POST", "/end_weight_update", {})

    def update_weights_from_tensor(self, serialized_named_tensors: Sequence[str], load_format: Optional[str] = None,
                                   weight_version: Optional[str] = None, flush_cache: bool = True) -> dict:
        """``POST /update_weights_from_tensor``: one base64 payload per TP rank of the server (rank i reads item i)."""
        return self._call("POST", "/update_weights_from_tensor", _without_none({
            "serialized_named_tensors": list(serialized_named_tensors),
            "load_format": load_format, "weight_version": weight_version, "flush_cache": flush_cache,
        }))

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> dict:
        """``POST /init_weights_update_group``: the server's TP ranks join a new process group as ranks
        ``rank_offset + tp_rank``; the trainer must join as rank 0 while this call is in flight."""
        return self._call("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend,
        })

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], group_name: str = "weight_update_group",
                                        load_format: Optional[str] = None, weight_version: Optional[str] = None,
                                        flush_cache: bool = True) -> dict:
        """``POST /update_weights_from_distributed``: the server receives these tensors by broadcast from rank 0,
        in list order, while this call is in flight."""
        if not (len(names) == len(dtypes) == len(shapes)):
            raise ValueError(f"names, dtypes and shapes differ in length: {len(names)}, {len(dtypes)}, {len(shapes)}")
        return self._call("POST", "/update_weights_from_distributed", _without_none({
            "names": list(names), "dtypes": [str(d).replace("torch.", "") for d in dtypes],
            "shapes": [list(s) for s in shapes], "group_name": group_name, "load_format": load_format,
            "weight_version": weight_version, "flush_cache": flush_cache,
        }))

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict:
        """``POST /destroy_weights_update_group``."""
        return self._call("POST", "/destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None,
                                 weight_version: Optional[str] = None, flush_cache: bool = True) -> dict:
        """``POST /update_weights_from_disk``: reload weights from an HF folder the server can read."""
        return self._call("POST", "/update_weights_from_disk", _without_none({
            "model_path": model_path, "load_format": load_format, "weight_version": weight_version,
            "flush_cache": flush_cache,
        }))

    def get_weights_by_name(self, name: str, truncate_size: Optional[int] = None) -> Any:
        """``POST /get_weights_by_name``: the parameter (HF name) as nested lists, first ``truncate_size`` rows."""
        return self._call("POST", "/get_weights_by_name", _without_none({"name": name, "truncate_size": truncate_size}))

    def release_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None:
        """``POST /release_memory_occupation`` (``kv_cache``, ``weights``, ``cuda_graph``); needs an idle server."""
        self._call("POST", "/release_memory_occupation", {"tags": list(tags) if tags is not None else None})

    def resume_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None:
        """``POST /resume_memory_occupation``."""
        self._call("POST", "/resume_memory_occupation", {"tags": list(tags) if tags is not None else None})

    # ---------------------------------------------------------------------------------------------

    def _call(self, method: str, endpoint: str, body: Optional[dict] = None) -> Any:
        try:
            answer = self._session.request(method, self.url + endpoint, json=body, timeout=self.timeout_s)
        except requests.RequestException as error:
            raise EngineUnreachableError(self.url, endpoint, f"{type(error).__name__}: {error}") from error
        payload = _payload(answer)
        if answer.status_code != 200:
            raise EngineError(self.url, endpoint, _message(payload) or answer.reason, status=answer.status_code)
        if isinstance(payload, dict) and payload.get("success") is False:
            raise EngineError(self.url, endpoint, _message(payload) or "success=false", status=200)
        return payload


def _payload(answer: requests.Response) -> Any:
    if not answer.content:
        return None
    try:
        return answer.json()
    except ValueError:
        return answer.text


def _message(payload: Any) -> str:
    if isinstance(payload, dict):
        for key in ("message", "detail", "error"):
            value = payload.get(key)
            if isinstance(value, dict):
                value = value.get("message", value)
            if value:
                return str(value)
        return str(payload)
    return "" if payload is None else str(payload).strip()


def _without_none(body: dict) -> dict:
    return {key: value for key, value in body.items() if value is not None}
