"""Count the host syncs a piece of torch code would make on a GPU, on the CPU.

On a GPU, a host sync is any call after which Python needs a value the device computes: ``.item()``, ``.tolist()``,
``bool(t)`` / ``int(t)`` / ``float(t)`` (an ``if`` on a tensor), ``.cpu()`` / ``.numpy()``, printing a tensor, and
the ops whose OUTPUT SIZE depends on the data (``nonzero``, ``unique``, ``masked_select``, indexing with a boolean
mask, ``repeat_interleave`` without ``output_size`` ...), plus host-to-device copies of Python data
(``torch.tensor(data, device=...)``: a blocking copy). ``torch.cuda.set_sync_debug_mode("warn")`` reports them on a
GPU; on the CPU nothing blocks, so the counter below stands in: it wraps those entry points for the duration of a
``with`` block and records each call with the line of project code that made it.

    with count_syncs() as syncs:
        loss, logs = head(x, y); loss.backward(); opt.step()
    assert syncs.total == 0, syncs.report()

The wrappers are plain patched attributes (not a TorchFunctionMode), so they also see the Python ``backward`` of
custom autograd functions. A call made while another counted call is running (``__format__`` -> ``item``) counts
once. Ops implemented in C++ that sync internally on CUDA (e.g. the backward of boolean-mask indexing) cannot be
seen on the CPU: the counter is the CPU stand-in, bench/gpu_check.py measures the real thing with
``torch.cuda.set_sync_debug_mode``.
"""
from __future__ import annotations

import contextlib
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

_REPO = Path(__file__).resolve().parent.parent
_state = threading.local()

# Tensor methods that always hand a device value to the host.
_ALWAYS_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "__format__",
                   "__repr__", "__array__", "cpu", "numpy", "nonzero", "unique", "unique_consecutive",
                   "masked_select", "argwhere", "bincount", "is_nonzero", "equal", "allclose")
# torch functions that always do.
_ALWAYS_FUNCTIONS = ("nonzero", "unique", "unique_consecutive", "masked_select", "argwhere", "bincount", "is_nonzero",
                     "equal", "allclose")


def _is_bool_tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor) and obj.dtype == torch.bool


def _has_bool_index(index: Any) -> bool:
    """A boolean-mask index (its result size is the number of True entries)."""
    if isinstance(index, (tuple, list)):
        return any(_is_bool_tensor(i) for i in index)
    return _is_bool_tensor(index)


def _getitem_syncs(args: tuple, kwargs: dict) -> bool:
    return len(args) > 1 and _has_bool_index(args[1])


def _setitem_syncs(args: tuple, kwargs: dict) -> bool:
    return len(args) > 1 and _has_bool_index(args[1])


def _index_put_syncs(args: tuple, kwargs: dict) -> bool:
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    return _has_bool_index(indices)


def _where_syncs(args: tuple, kwargs: dict) -> bool:
    return len(args) + len(kwargs) == 1  # torch.where(cond) is nonzero(cond)


def _repeat_interleave_syncs(args: tuple, kwargs: dict) -> bool:
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    if len(args) == 1 and isinstance(args[0], torch.Tensor) and repeats is None:
        repeats = args[0]  # torch.repeat_interleave(repeats)
    return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None


def _host_data_to_device(args: tuple, kwargs: dict) -> bool:
    """torch.tensor / as_tensor of Python data onto a named device: a blocking host-to-device copy on a GPU."""
    data = args[0] if args else kwargs.get("data")
    return not isinstance(data, torch.Tensor) and kwargs.get("device") is not None


_CONDITIONAL_METHODS: dict[str, Callable[[tuple, dict], bool]] = {
    "__getitem__": _getitem_syncs, "__setitem__": _setitem_syncs, "index_put_": _index_put_syncs,
    "index_put": _index_put_syncs, "repeat_interleave": _repeat_interleave_syncs}
_CONDITIONAL_FUNCTIONS: dict[str, Callable[[tuple, dict], bool]] = {
    "where": _where_syncs, "index_put": _index_put_syncs, "repeat_interleave": _repeat_interleave_syncs,
    "tensor": _host_data_to_device, "as_tensor": _host_data_to_device}


@dataclass
class SyncCounter:
    """The syncs seen: (op name, project line that called it), in order."""

    events: list[tuple[str, str]] = field(default_factory=list)
    paused: bool = False

    @property
    def total(self) -> int:
        return len(self.events)

    def by_op(self) -> Counter:
        return Counter(op for op, _ in self.events)

    def by_site(self) -> Counter:
        return Counter(f"{op} at {site}" for op, site in self.events)

    def report(self) -> str:
        if not self.events:
            return "no host sync"
        return f"{self.total} host sync(s):\n" + "\n".join(f"  {n} x {what}" for what, n in
                                                          self.by_site().most_common())

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Calls made inside are not counted (e.g. a test's own checks between two counted steps)."""
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was


def _call_site() -> str:
    """The innermost calling frame outside torch and this file (repository paths relative to its root)."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path.name == "sync_count.py" or "site-packages" in path.parts or frame.filename.startswith("<"):
            continue
        try:
            where = str(path.resolve().relative_to(_REPO))
        except ValueError:
            where = path.name
        return f"{where}:{frame.lineno} ({frame.name})"
    return "?"


def _wrap(original: Callable, name: str, counter: SyncCounter, condition: Callable[[tuple, dict], bool] | None):
    def wrapper(*args, **kwargs):
        depth = getattr(_state, "depth", 0)
        if depth or counter.paused or (condition is not None and not condition(args, kwargs)):
            return original(*args, **kwargs)
        counter.events.append((name, _call_site()))
        _state.depth = 1  # what the counted call does inside (format -> item) is part of it
        try:
            return original(*args, **kwargs)
        finally:
            _state.depth = 0
    wrapper.__name__ = getattr(original, "__name__", name)
    wrapper.__doc__ = getattr(original, "__doc__", None)
    return wrapper


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    """Count the host syncs made inside the block (see the module docstring); patches are undone on exit."""
    counter = SyncCounter()
    patched: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, label: str, condition=None) -> None:
        if not hasattr(owner, attr):
            return
        patched.append((owner, attr, vars(owner).get(attr, _MISSING)))
        setattr(owner, attr, _wrap(getattr(owner, attr), label, counter, condition))

    for name in _ALWAYS_METHODS:
        patch(torch.Tensor, name, f"Tensor.{name}")
    for name, cond in _CONDITIONAL_METHODS.items():
        patch(torch.Tensor, name, f"Tensor.{name}", cond)
    for name in _ALWAYS_FUNCTIONS:
        patch(torch, name, f"torch.{name}")
    for name, cond in _CONDITIONAL_FUNCTIONS.items():
        patch(torch, name, f"torch.{name}", cond)
    try:
        yield counter
    finally:
        for owner, attr, original in reversed(patched):
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


class _Missing:
    pass


_MISSING = _Missing()
