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

__all__ = ["ray_layers", "RayError", "RayInputs"]

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
        if not host or not port.isdigit():
            raise RayError(f"--ray {address!r}: give HOST:PORT (e.g. 10.0.0.5:6379), 'auto' (the cluster this "
                           "machine belongs to) or 'local'")  # fmt: skip
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        except (OSError, ValueError) as e:
            raise RayError(f"the Ray cluster at {address!r} does not answer ({e}); start one with `ray start --head` "
                           "or use 'local'") from None  # fmt: skip
    if ray.is_initialized():  # this process already joined (or started) a cluster: use it
        return
    if address == "local":  # a new cluster in this process, even where `ray start` left a record of another
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise RayError(f"cannot join the Ray cluster at {address!r}: {e} (Ray's log lines above name the cause, e.g. "
                       "a missing authentication token; on a node of that cluster, --ray auto joins it with the "
                       "node's own credentials)") from None  # fmt: skip


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


# ---- calibrated methods: the calibration set split across workers ------------------------------
class _Shard:
    """A Ray actor's part of the calibration set: the current block inputs ``(args, kwargs)`` of
    the batches ``index`` (and their token masks). It runs whatever block the driver sends on them:
    gathering the statistics the driver asks for, or moving them through the block."""

    def __init__(self, index: list[int], inputs: list, masks: list, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.index, self.inputs, self.masks = index, inputs, masks

    def stats(self, block, hooked: list[str], wanted: dict, stop: str | None = None):
        """Run ``block`` on every input with pre-hooks on the submodules ``hooked``; for each name in
        ``wanted`` (``name -> (K, needs, {batch: sorted row indices})``) sum what
        :class:`lowbit.calibrate.Stats` sums: tokens, ``X^T X`` ("hessian"), pairwise fourth moments
        ("fourth"), the largest ``|x|`` per column ("absmax"), the sum of ``|x|`` per column ("absmean").
        ``stop``: end each pass at that submodule (its input is all that is wanted).
        Returns ``({name: Stats}, names reached)``: the driver merges them (``Stats.merge``)."""
        import torch

        from .calibrate import Stats, _real_tokens, _Stop

        sums = {n: Stats(k, frozenset(needs)) for n, (k, needs) in wanted.items()}  # as the driver's Stats.add
        reached: set[str] = set()
        current = [None, None]  # (batch index, mask) of the pass running

        def pre(n, x):
            if x.numel() == 0:
                return
            reached.add(n)
            if n in wanted:
                x = _real_tokens(x, current[1])
                if x.numel():
                    sums[n].add(x)  # (raises CalibrationError for NaN/Inf)
            if n == stop:
                raise _Stop

        mods = {n: block.get_submodule(n) for n in hooked}
        handles = [m.register_forward_pre_hook(lambda m, a, n=n: pre(n, a[0])) for n, m in mods.items()]
        try:
            with torch.no_grad():
                for b, (args, kwargs), mask in zip(self.index, self.inputs, self.masks):
                    current[0], current[1] = b, mask
                    try:
                        block(*args, **kwargs)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        return sums, reached

    def advance(self, block) -> None:
        """The block's outputs become the inputs of the next block."""
        import torch

        from .calibrate import _block_outputs, _with_hidden

        with torch.no_grad():
            self.inputs = [_with_hidden(inp, _block_outputs(block(*inp[0], **inp[1]))) for inp in self.inputs]

    def outputs(self, block) -> list:
        import torch

        from .calibrate import _block_outputs

        with torch.no_grad():
            return [_block_outputs(block(*inp[0], **inp[1])) for inp in self.inputs]


class RayInputs:
    """The calibration inputs of the current block, split across Ray actors (:class:`_Shard`) in
    contiguous runs of batches; the driver keeps the first batch (the checks that run one batch).
    Statistics come back summed per actor and are added up here in batch order: the same numbers as
    one process up to float summation order (and the actors' thread count)."""

    def __init__(self, address: str, inputs: list, masks: list, workers: int | None = None):
        _connect(address)
        import ray

        n = max(1, min(len(inputs), workers or int(ray.cluster_resources().get("CPU", 1))))
        bounds = [round(i * len(inputs) / n) for i in range(n + 1)]
        actor = ray.remote(num_cpus=1)(_Shard)
        self._ray = ray
        self.first = inputs[0]
        self.count = len(inputs)
        self.actors = [actor.remote(list(range(a, b)), inputs[a:b], masks[a:b]) for a, b in zip(bounds, bounds[1:])]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if i == 0 or i == slice(None, 1, None):
            return self.first if i == 0 else [self.first]
        raise IndexError("the driver holds only the first calibration batch; the rest are on the Ray workers")

    def _all(self, method: str, *args) -> list:
        return self._ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def stats(self, block, hooked: list[str], wanted: dict, stop: str | None = None):
        """Per name in ``wanted`` (``name -> Stats`` to add into, empty), the sums of every batch;
        returns the names reached."""
        spec = {n: (st.k, frozenset(st.need)) for n, st in wanted.items()}
        block_ref = self._ray.put(block)
        reached: set[str] = set()
        for part, seen in self._all("stats", block_ref, hooked, spec, stop):
            reached |= seen
            for n, st in part.items():
                wanted[n].merge(st)
        return reached

    def advance(self, block) -> None:
        block_ref = self._ray.put(block)
        self._all("advance", block_ref)
        import torch

        from .calibrate import _block_outputs, _with_hidden

        with torch.no_grad():
            self.first = _with_hidden(self.first, _block_outputs(block(*self.first[0], **self.first[1])))

    def outputs(self, block) -> list:
        block_ref = self._ray.put(block)
        return [o for part in self._all("outputs", block_ref) for o in part]

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
