"""Callbacks that do not keep their owner alive."""
from __future__ import annotations

import inspect
import weakref
from typing import Callable


def weak_callback(fn: Callable) -> Callable:
    """``fn``, holding its object weakly when it is a bound method.

    A handler that keeps its owner's bound method makes a reference cycle
    (owner -> handler -> method -> owner) that only a full garbage collection
    frees, with the owner's buffers: after many aborted migrations that was
    tens of MiB of a worker's RSS. Once the owner is gone, calls do nothing.
    """
    if not inspect.ismethod(fn):
        return fn
    ref = weakref.WeakMethod(fn)

    def call(*args):
        m = ref()
        if m is not None:
            return m(*args)
        return None

    return call
