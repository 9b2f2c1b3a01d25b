"""Calling the service's Ray actors, found by name: the core and worker calls of a
`MemoryEngine` over Ray.

A service named `name` has a coordinator actor `coordinator-<name>` (the catalog) and shard
actors `shard-<name>-<index>`, all in the Ray namespace `longmem`; any process in the
cluster can call them. A call to an actor that is down fails with `errors.Unavailable`
naming it.
"""

from __future__ import annotations

import functools
import warnings

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from memory_service.engine import MemoryEngine
from memory_service.errors import ServiceError, Unavailable

NAMESPACE = "longmem"
CALL_TIMEOUT_S = 120.0  # an actor slower than this counts as unavailable
# torch tensors cross actor boundaries through shared memory and arrive read-only; the
# service only ever reads them
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def coordinator_name(service: str) -> str:
    return f"coordinator-{service}"


def shard_name(service: str, index: int) -> str:
    return f"shard-{service}-{index}"


def unavailable(what: str, index: int) -> Unavailable:
    return Unavailable(
        f"{what} {index} is unavailable (restarting, or its node is gone); retry shortly"
    )


def get_all(refs: dict[int, ray.ObjectRef], what: str, partial: bool = False) -> dict[int, object]:
    """ray.get each ref. A ServiceError raised in an actor is re-raised as itself; an actor
    that is down raises Unavailable, or with `partial` is left out of the answer."""
    out = {}
    for s, ref in refs.items():
        try:
            out[s] = ray.get(ref, timeout=CALL_TIMEOUT_S)
        except RayTaskError as e:
            if isinstance(e.cause, ServiceError):
                raise e.cause from None
            raise
        except (RayActorError, GetTimeoutError):
            if not partial:
                raise unavailable(what, s) from None
    return out


class CoordinatorCall:
    """A `engine.CoreCall` to the coordinator actor of service `service`."""

    def __init__(self, service: str):
        self.service = service

    @functools.cached_property
    def handle(self) -> ray.actor.ActorHandle:  # looked up on first use: it may start later
        return ray.get_actor(coordinator_name(self.service), namespace=NAMESPACE)

    def __call__(self, method: str, *args):
        return get_all({0: getattr(self.handle, method).remote(*args)}, "coordinator")[0]


class ShardActors:
    """A `search.ShardCall` to the shard actors of service `service`.

    Shards in `down` (the deployment's health check keeps it) fail fast, or are left out of
    a partial answer, instead of being waited for while they restart.
    """

    def __init__(self, service: str, n_shards: int):
        self.service, self.n_shards = service, n_shards
        self.down: set[int] = set()

    @functools.cached_property
    def handles(self) -> list[ray.actor.ActorHandle]:
        names = [shard_name(self.service, i) for i in range(self.n_shards)]
        return [ray.get_actor(n, namespace=NAMESPACE) for n in names]

    def __call__(
        self, method: str, args: dict[int, tuple], partial: bool = False
    ) -> dict[int, object]:
        down = self.down & set(args)
        if down and not partial:
            raise unavailable("shard", min(down))
        refs = {
            s: getattr(self.handles[s], method).remote(*a)
            for s, a in args.items()
            if s not in down
        }
        return get_all(refs, "shard", partial)


def ray_engine(service: str, n_shards: int, allow_partial: bool = False) -> MemoryEngine:
    """The engine of service `service` (`n_shards` shards) running on this Ray cluster."""
    return MemoryEngine(
        n_shards, CoordinatorCall(service), ShardActors(service, n_shards), allow_partial
    )
