"""Streamed quantization spread over a Ray cluster (the ``ray`` extra: ``pip install 'lowbit[ray]'``).

Each planned layer of a checkpoint is one Ray task: the worker opens the checkpoint at the same
path (shared storage), reads that layer's weight, quantizes it exactly as the single-process path
does (:func:`lowbit.checkpoint.quantize_layer`) and returns the packed tensors; the driver keeps a
bounded window of tasks in flight and writes the results in the model's order, so the output is
byte-identical to a run without Ray and the driver holds at most ``window`` layers' outputs.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterator

__all__ = ["ray_layers", "RayError"]

_WORKER_CACHE: dict = {}  # per worker process: checkpoint path -> Checkpoint


class RayError(RuntimeError):
    """Ray is not installed, or the cluster address does not answer."""


def _connect(address: str) -> None:
    try:
        import ray
    except ImportError as e:
        raise RayError("--ray needs the 'ray' extra: pip install 'lowbit[ray]'") from e
    if address not in ("local", "auto"):  # an explicit address must answer, whatever else runs here
        host, _, port = address.rpartition(":")
        host = host.removeprefix("ray://")
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        except (OSError, ValueError) as e:
            raise RayError(f"the Ray cluster at {address!r} does not answer ({e}); start one with `ray start --head` "
                           "or use 'local'") from None  # fmt: skip
    if ray.is_initialized():  # this process already joined (or started) a cluster: use it
        return
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise RayError(f"cannot join the Ray cluster at {address!r}: {e}") from None


def _layer_task(src: str, mname: str, mod, kind: str, scheme: str, weight_name: str, method: str, options: dict):
    import torch

    from .algorithms import get_algorithm
    from .checkpoint import Checkpoint, quantize_layer
    from .scheme import parse_scheme

    torch.set_num_threads(1)  # one task per CPU: Ray schedules the parallelism
    if src not in _WORKER_CACHE:  # (the header of every shard, read once per worker)
        _WORKER_CACHE[src] = Checkpoint(src)
    return quantize_layer(_WORKER_CACHE[src], mname, mod, kind, parse_scheme(scheme), get_algorithm(method), options,
                          weight_name=weight_name)  # fmt: skip


def ray_layers(address: str, src: str, layers: list[tuple], method: str, options: dict, *,
               workers: int | None = None) -> Iterator:  # fmt: skip
    """Results of :func:`lowbit.checkpoint.quantize_layer` for ``layers`` ``[(name, skeleton module,
    kind, scheme, the checkpoint's name of its weight)]`` computed on the Ray cluster at ``address``, yielded in order, with at most
    ``workers`` (default: the cluster's CPUs) tasks in flight. Each task carries its layer's module
    on the meta device (a few hundred bytes), so workers never build the model's skeleton (nor
    import transformers). Raises :class:`RayError` (no Ray, no answer)."""
    _connect(address)
    import ray

    window = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1)(_layer_task)
    pending: deque = deque()
    todo = iter(layers)

    def submit() -> None:
        for name, mod, kind, scheme, weight_name in todo:
            pending.append(task.remote(src, name, mod, kind, scheme, weight_name, method, options))
            if len(pending) >= window:
                return

    def results():
        submit()
        while pending:
            ref = pending.popleft()
            out = ray.get(ref)
            del ref
            submit()
            yield out

    return results()
