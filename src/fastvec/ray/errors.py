"""The error a dead node actor raises."""

from __future__ import annotations

from fastvec.errors import WorkerDiedError

__all__ = ["ActorDiedError"]


class ActorDiedError(WorkerDiedError):
    """A node actor of :class:`fastvec.ray.RayVectorEnv` died (its process was killed, it
    crashed, or its node left the cluster) while the vector env needed it.

    Raised by the call that was waiting on the actor, within Ray's own detection time: at
    once for a dead process; for a lost node, once Ray's health checks declare the node dead
    (``health_check_period_ms`` x ``health_check_failure_threshold``, ~15 s by default).
    It is a :class:`fastvec.errors.WorkerDiedError` (so an ``EOFError`` and a
    ``BrokenPipeError`` too): handlers written for the local pool catch it.

    Attributes
    ----------
    actor : int
        The actor's index (its place in the vector env's list of nodes).
    node_id, node_ip : str
        The Ray node it ran on.
    env_indices : tuple[int, ...]
        The global ids of its envs.
    pid : int | None
        Its process id.
    restarted : bool
        ``True`` when ``restart_workers=True`` had Ray restart the actor and its envs are
        back (the vector env is usable; repeat the call). ``False``: the vector env is
        broken; close it.
    cause : str
        What Ray said.
    """

    def __init__(self, message: str, actor: int = -1, node_id: str = "", node_ip: str = "",
                 env_indices: tuple[int, ...] = (), pid: int | None = None,
                 restarted: bool = False, cause: str = "") -> None:
        super().__init__(message, worker=actor, env_indices=env_indices, pid=pid,
                         restarted=restarted)
        self.actor, self.node_id, self.node_ip, self.cause = actor, node_id, node_ip, cause

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (type(self), (str(self), self.actor, self.node_id, self.node_ip,
                             self.env_indices, self.pid, self.restarted, self.cause))
