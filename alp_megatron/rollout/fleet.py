"""The rollout side of a run, held by global rank 0: SGLang servers (launched here or given by URL), the
optional router, the sampler, and a background event loop so a rollout can run while the trainer trains.

Servers launched here that die are brought back (``rollout.restart_dead_servers``): a
:class:`~alp_megatron.rollout.server.ServerSupervisor` sees the death, the server leaves the client and the
router at once (its requests go to the others, or wait while none is left), and is restarted; restarted, it is
*stale* until the run has pushed the current weights into it (:attr:`RolloutEngines.on_stale`, called from
:meth:`RolloutEngines.tend` while the run waits for a rollout, or the step's own update), and only then rejoins
the router and the client. At 64 servers this is one thread per restart and a few set operations; the weights
reach a restarted server by the same transport as every update.

Nothing here imports Megatron; the loop hands the samples to the trainer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Callable, Optional, Sequence

from alp_megatron.errors import ConfigError
from alp_megatron.rollout.agent import Agent
from alp_megatron.rollout.client import ClientConfig, RolloutClient
from alp_megatron.rollout.engine_control import EngineControl
from alp_megatron.rollout.router import RouterConfig, SGLangRouter
from alp_megatron.rollout.sampler import Sampler, SamplerConfig
from alp_megatron.rollout.errors import ServerStartError
from alp_megatron.rollout.server import ServerConfig, ServerSupervisor, start_servers, stop_servers
from alp_megatron.rollout.types import RolloutBatch

logger = logging.getLogger(__name__)


def launched_server_gpus(rollout_config, trainer_gpus_on_node: int, visible_gpus: int) -> list[Optional[int]]:
    """The first GPU of each server launched here (``--base-gpu-id``; None for all without GPUs): side by side
    from ``rollout.server_first_gpu``, by default 0 when colocated (the servers share the trainer's GPUs) and
    just after the trainer ranks of this node when disaggregated. A placement beyond the visible GPUs is an
    error naming the fields."""
    servers, tp_size = rollout_config.servers, rollout_config.server_tp_size
    if visible_gpus == 0:
        return [None] * servers
    first = rollout_config.server_first_gpu
    if first is None:
        first = 0 if rollout_config.mode == "colocated" else trainer_gpus_on_node
    if first + servers * tp_size > visible_gpus:
        raise ConfigError("rollout.servers",
                          f"{servers} server(s) x server_tp_size {tp_size} GPUs from GPU {first} need GPUs up to "
                          f"{first + servers * tp_size - 1}, but {visible_gpus} are visible",
                          "launch fewer or smaller servers, set rollout.server_first_gpu, or (disaggregated) run "
                          "the servers elsewhere and list them in rollout.server_urls")
    return [first + i * tp_size for i in range(servers)]


class RolloutEngines:
    """Servers + router + sampler of a run. ``submit`` starts a rollout and returns a Future at once.
    ``trainer_gpus_on_node``: how many trainer ranks (GPUs) this node runs, for the servers' placement;
    ``routed_experts``: (layers, top_k, experts) of an MoE model whose routes every sample carries (routing
    replay): launched servers get ``--enable-return-routed-experts``, and servers given by URL must have it."""

    def __init__(self, rollout_config, model_path: str, log_dir: str, weight_version: str, vocab_size: int,
                 trainer_gpus_on_node: int = 1, routed_experts: Optional[tuple[int, int, int]] = None):
        self.config = rollout_config
        self.servers, self.router = [], None
        if rollout_config.server_urls:
            self.worker_urls = tuple(url.rstrip("/") for url in rollout_config.server_urls)
            for url in self.worker_urls:  # fail at start, naming the engine, rather than at the first rollout
                EngineControl(url, api_key=rollout_config.api_key, timeout_s=30).model_info()
        else:
            import torch

            first_gpus = launched_server_gpus(rollout_config, trainer_gpus_on_node, torch.cuda.device_count())
            configs = [
                ServerConfig(model_path=model_path, port=0, host=rollout_config.host, tp_size=rollout_config.server_tp_size,
                             base_gpu_id=first_gpu, dtype=rollout_config.server_dtype,
                             mem_fraction=rollout_config.server_mem_fraction,
                             weight_version=weight_version, api_key=rollout_config.api_key,
                             extra_args=tuple(rollout_config.server_extra_args)
                             + (("--enable-return-routed-experts",) if routed_experts else ()), log_dir=log_dir,
                             startup_timeout_s=rollout_config.startup_timeout_s)
                for first_gpu in first_gpus
            ]
            logger.info("starting %d SGLang server(s) on %s (logs in %s)", len(configs), model_path, log_dir)
            self.servers = start_servers(configs)
            self.worker_urls = tuple(server.url for server in self.servers)
        try:
            generate_urls = (rollout_config.router_url,) if rollout_config.router_url else self.worker_urls
            if rollout_config.router and not rollout_config.router_url:
                self.router = SGLangRouter(RouterConfig(worker_urls=self.worker_urls, host=rollout_config.host,
                                                        api_key=rollout_config.api_key, log_dir=log_dir))
                self.router.start()
                self.router.wait_healthy()
                generate_urls = (self.router.url,)
            client = RolloutClient(ClientConfig(urls=generate_urls, control_urls=self.worker_urls,
                                                api_key=rollout_config.api_key, vocab_size=vocab_size,
                                                routed_experts=routed_experts))
            sampling = rollout_config.sampling
            if rollout_config.engine_temperature is not None:  # a deliberate behaviour-policy mismatch
                sampling = dataclasses.replace(sampling, temperature=rollout_config.engine_temperature)
            agent = None
            if rollout_config.agent is not None:  # multi-turn: the served model's tokenizer reads and writes turns
                from transformers import AutoTokenizer

                agent = Agent(rollout_config.agent, AutoTokenizer.from_pretrained(model_path),
                              context_tokens=_context_tokens(model_path, rollout_config.server_extra_args))
            self.sampler = Sampler(client, SamplerConfig(sampling=sampling,
                                                         groups_in_flight=rollout_config.groups_in_flight,
                                                         restart_aborted=rollout_config.partial_rollouts == "restart"),
                                   agent=agent)
            self.controls = [EngineControl(url, api_key=rollout_config.api_key) for url in self.worker_urls]
            self._busy_lock, self._rollouts_running, self._busy_since, self._busy_seconds = threading.Lock(), 0, 0.0, 0.0
            self._stale: set[str] = set()  # restarted servers that do not hold the current weights yet
            self._last_targets: list[str] = list(self.worker_urls)  # of the last weight update
            self.on_stale: Optional[Callable[[list[str]], None]] = None  # the run pushes the current weights
            self.supervisor: Optional[ServerSupervisor] = None
            if self.servers and rollout_config.restart_dead_servers:
                self.supervisor = ServerSupervisor(self.servers, interval_s=1.0, on_death=self._take_out_of_service,
                                                   on_restarted=lambda server: self._stale.add(server.url),
                                                   max_failures=rollout_config.max_restart_attempts)
                client.recovering = self.recovering
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-loop", daemon=True)
            self._thread.start()
            if self.supervisor is not None:
                self.supervisor.start()
        except BaseException:
            self._stop_processes()
            raise

    @property
    def engine_tp_sizes(self) -> Sequence[int]:
        return [self.config.server_tp_size] * len(self.worker_urls)

    @property
    def group_size(self) -> int:
        return self.sampler.config.sampling.n

    def submit(self, prompts: Sequence, group_ids: Sequence[int],
               on_group: Optional[Callable[[list], None]] = None) -> "Future[RolloutBatch]":
        """Start a rollout of ``prompts`` (token ids or data records, one group each) on the background loop;
        returns its Future. ``on_group(samples)`` is called on that loop's thread as each group completes."""
        self._count_busy(+1)
        future = asyncio.run_coroutine_threadsafe(self.sampler.rollout(prompts, group_ids, on_group), self._loop)
        future.add_done_callback(lambda _: self._count_busy(-1))
        return future

    def _count_busy(self, change: int) -> None:
        with self._busy_lock:
            now = time.perf_counter()
            if change > 0 and self._rollouts_running == 0:
                self._busy_since = now
            self._rollouts_running += change
            if self._rollouts_running == 0:
                self._busy_seconds += now - self._busy_since

    def busy_seconds(self) -> float:
        """Seconds so far during which at least one rollout ran (the rest of the time the engines idled)."""
        with self._busy_lock:
            running = time.perf_counter() - self._busy_since if self._rollouts_running else 0.0
            return self._busy_seconds + running

    def abort(self) -> None:
        """End the rollouts in flight: no new group starts, and every running request returns aborted."""
        asyncio.run_coroutine_threadsafe(self.sampler.abort(), self._loop).result()

    def release_memory(self) -> None:
        """Colocated mode: SGLang frees its GPU memory (weights, KV cache) while Megatron trains.
        Needs ``--enable-memory-saver`` on a GPU; on CPU it is a no-op in SGLang."""
        for control in self._live_controls():
            control.release_memory_occupation()

    def resume_memory(self) -> None:
        for control in self._live_controls():
            control.resume_memory_occupation()

    def _live_controls(self) -> list[EngineControl]:
        up = set(self._up_urls())  # not a server that is dead or restarting
        return [control for control in self.controls if control.url in up]

    # ---------------------------------------------------------------------------------------------
    # servers that die (launched ones: the supervisor restarts them, see the module docstring)

    def _take_out_of_service(self, server) -> None:
        """A server died: no request goes to it (client, router) until it is back with the current weights."""
        self._stale.discard(server.url)
        self.sampler.client.set_in_service(server.url, False)
        if self.router is not None:
            try:
                self.router.remove_worker(server.url)
            except Exception as error:  # noqa: BLE001 - the router also stops routing to a worker that fails
                logger.warning("could not take %s out of the router: %s", server.url, error)

    def recovering(self) -> bool:
        """Whether a launched server is dead, restarting, or restarted and waiting for the current weights."""
        supervisor = self.supervisor
        return supervisor is not None and bool(supervisor.dead() or supervisor.restarting or self._stale)

    def stale_servers(self) -> list[str]:
        """Restarted servers, healthy, that must get the current weights before they serve."""
        return sorted(self._stale)

    def _up_urls(self) -> list[str]:
        """Every engine but the dead, the restarting and the given up."""
        if self.supervisor is None:
            return list(self.worker_urls)
        out = {server.url for server in self.supervisor.dead()} | set(self.supervisor.restarting) \
            | set(self.supervisor.given_up)
        return [url for url in self.worker_urls if url not in out]

    def sync_targets(self) -> list[str]:
        """The engines a weight update goes to (:meth:`_up_urls`), remembered for :meth:`after_sync`."""
        self._last_targets = self._up_urls()
        return list(self._last_targets)

    def after_sync(self) -> None:
        """After a weight update to :meth:`sync_targets`: the restarted engines among them serve again."""
        self.return_to_service([url for url in self._last_targets if url in self._stale])

    def fleet_metrics(self) -> dict:
        """``server_restarts`` (so far, all servers) and ``servers_in_service`` (now)."""
        if self.supervisor is None:
            return {"servers_in_service": float(len(self.worker_urls))}
        return {"server_restarts": float(sum(self.supervisor.restarts.values())),
                "servers_in_service": float(len(self.serving_controls()))}

    def serving_controls(self) -> list[EngineControl]:
        serving = set(self._up_urls()) - self._stale
        return [control for control in self.controls if control.url in serving]

    def return_to_service(self, urls) -> None:
        """Engines that now hold the current weights take requests again (router first, then the client)."""
        for url in urls:
            if url not in self._stale:
                continue
            if self.router is not None:
                self.router.add_worker(url)
            self._stale.discard(url)
            self.sampler.client.set_in_service(url, True)
            logger.info("SGLang server %s is back in service with the current weights", url)

    def tend(self) -> None:
        """Called on the run's main thread while it waits for rollouts: raise when no engine is left, and hand
        restarted engines to :attr:`on_stale` for the current weights."""
        supervisor = self.supervisor
        if supervisor is not None and len(supervisor.given_up) == len(self.servers):
            raise ServerStartError("SGLang servers", ", ".join(self.worker_urls), "all died and could not be "
                                   f"brought back ({supervisor.given_up})", None, "")
        stale = self.stale_servers()
        if stale and self.on_stale is not None:
            self.on_stale(stale)

    def wait(self, future: Future):
        """``future.result()``, tending the servers every half second meanwhile (see :meth:`tend`)."""
        while True:
            try:
                return future.result(timeout=0.5)
            except TimeoutError:
                self.tend()

    def recover_now(self) -> None:
        """Restart every dead server now and wait until each is healthy (a weight update that failed on one
        retries on its replacement); gives a server up after ``rollout.max_restart_attempts`` failures."""
        while self.supervisor is not None and (self.supervisor.dead() or self.supervisor.restarting):
            self.supervisor.check_once(wait=True)

    def wait_for_a_server(self) -> None:
        """Return once some engine is up (serving, or restarted and waiting for weights); raise when none can be."""
        while self.supervisor is not None and not self._up_urls():
            self.recover_now()
            self.tend()

    def _stop_processes(self) -> None:
        if getattr(self, "supervisor", None) is not None:
            self.supervisor.stop()
        if self.router is not None:
            self.router.stop()
        stop_servers(self.servers)

    def close(self) -> None:
        """Stop the background loop and every process this object started (by process id)."""
        loop = getattr(self, "_loop", None)
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._end_rollouts(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=30)
            if not self._thread.is_alive():
                loop.close()
        self._stop_processes()

    async def _end_rollouts(self) -> None:
        """Cancel the rollouts still in flight (a run stopped mid-rollout) and close the client."""
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sampler.client.close()


def server_log_dir(output_dir: str) -> str:
    path = os.path.join(output_dir, "logs")
    os.makedirs(path, exist_ok=True)
    return path


def _context_tokens(model_path: str, server_args: Sequence[str] = ()) -> Optional[int]:
    """The served context length: the servers' ``--context-length`` if given, else ``max_position_embeddings``
    of the model's config.json (None if neither says)."""
    args = list(server_args)
    if "--context-length" in args[:-1]:
        return int(args[args.index("--context-length") + 1])
    with open(os.path.join(model_path, "config.json")) as handle:
        config = json.load(handle)
    value = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    return int(value) if value else None
