"""Run a model on several batches at once, pausing every batch at the same layers: one forward pass for all layers.

Layer-by-layer rounding needs, for each layer in turn, its inputs over the whole calibration set *after* every
earlier layer has been rounded. Running the network from its input again for each layer costs about half a forward
pass per layer. :class:`Lockstep` instead runs each batch's forward in its own thread and stops it at a forward
pre-hook of each chosen layer, until the caller has seen that layer's inputs from every batch and changed what it
wanted (rounded the layer's weight); then every batch goes on to the next chosen layer. The whole walk is one forward
pass over the calibration set, for any model whose batches call the chosen layers in the same order, each once.

PyTorch releases the GIL inside its kernels, so the threads cost nothing but the activations they keep alive (one
batch's live tensors each). Grad and inference modes are per thread: each worker runs under the mode of the thread
that started it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType

import torch
from torch import Tensor, nn


class LockstepError(RuntimeError):
    """The batches did not reach the chosen layers in the same order (or one batch ended before another)."""


class _Abort(Exception):
    """Raised inside a worker's hook to unwind its forward pass when the walk stops early."""


class Lockstep:
    """Forward passes of ``batches`` through ``model`` in threads, each paused at every layer of ``pause_at``.

    Use as a context manager; in it, for each chosen layer in execution order, :meth:`inputs_at` returns its input
    from every batch (the batches are paused there) and :meth:`release` lets them run on to the next one.

    Args:
        model: Any module.
        pause_at: ``{name: module}`` of the layers to pause at (each must be called once per forward).
        batches: Inputs, one forward pass each.
    """

    def __init__(self, model: nn.Module, pause_at: dict[str, nn.Module], batches: Sequence[Tensor]) -> None:
        self.model = model
        self.pause_at = pause_at
        self.batches = list(batches)
        self._condition = threading.Condition()
        self._arrived: dict[str, dict[int, Tensor]] = {}
        self._released: set[str] = set()
        self._position: dict[int, str | None] = {}  # worker -> the layer it waits at (None while running)
        self._finished: set[int] = set()
        self._errors: list[BaseException] = []
        self._abort = False
        self._local = threading.local()
        self._threads: list[threading.Thread] = []
        self._handles: list = []

    def __enter__(self) -> Lockstep:
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.pause_at.items()]
        inference = torch.is_inference_mode_enabled()
        grad = torch.is_grad_enabled()
        for index, x in enumerate(self.batches):
            thread = threading.Thread(target=self._work, args=(index, x, inference, grad), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        with self._condition:
            self._abort = kind is not None or self._abort
            self._released.update(self.pause_at)  # nothing pauses any more: run to the end (or unwind)
            self._condition.notify_all()
        for thread in self._threads:
            thread.join()
        for handle in self._handles:
            handle.remove()
        if kind is None and self._errors:
            raise self._errors[0]

    def _work(self, index: int, x: Tensor, inference: bool, grad: bool) -> None:
        self._local.index = index
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                if x.is_cuda:
                    torch.cuda.set_device(x.device)
                self.model(x)
        except _Abort:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            with self._condition:
                self._errors.append(error)
        finally:
            with self._condition:
                self._finished.add(index)
                self._position.pop(index, None)
                self._condition.notify_all()

    def _hook(self, name: str):
        def pause(module: nn.Module, args: tuple) -> None:
            index = getattr(self._local, "index", None)
            if index is None:  # a forward of the caller's own thread: not one of ours
                return
            with self._condition:
                if name in self._released:
                    if self._abort:
                        raise _Abort
                    return
                self._arrived.setdefault(name, {})[index] = args[0].detach()
                self._position[index] = name
                self._condition.notify_all()
                self._condition.wait_for(lambda: name in self._released or self._abort)
                self._position[index] = None
                if self._abort:
                    raise _Abort

        return pause

    def inputs_at(self, name: str) -> list[Tensor]:
        """The input of layer ``name`` from every batch, in batch order, once every batch has paused there.

        Raises:
            LockstepError: If a batch paused at another layer or finished without calling ``name``.
            Exception: Whatever a batch's forward pass raised.
        """
        count = len(self.batches)
        with self._condition:

            def settled() -> bool:
                if self._errors:
                    return True
                arrived = len(self._arrived.get(name, {}))
                elsewhere = sum(1 for at in self._position.values() if at is not None and at != name)
                return arrived == count or arrived + elsewhere + len(self._finished) == count

            self._condition.wait_for(settled)
            if self._errors:
                raise self._errors[0]
            arrived = self._arrived.get(name, {})
            if len(arrived) != count:
                others = sorted({at for at in self._position.values() if at is not None and at != name})
                raise LockstepError(
                    f"expected every batch at layer {name!r}, but {count - len(arrived)} of {count} paused at "
                    f"{others} or finished: the model does not call its layers in the same order for every batch"
                )
            return [arrived[index] for index in range(count)]

    def release(self, name: str) -> None:
        """Let every batch paused at ``name`` run on (and forget their inputs there)."""
        with self._condition:
            self._released.add(name)
            self._arrived.pop(name, None)
            for index, at in self._position.items():
                if at == name:  # running again from now on, even before its thread wakes up
                    self._position[index] = None
            self._condition.notify_all()
