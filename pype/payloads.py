"""Large items travel through Ray's object store by reference, not through the shard.

Passed by value, a 6 MB frame would be copied into the object store as the push's
argument and again as the pull's result. Instead the client puts a large item
into the object store once (ray.put) and pushes a small ByReference in its place.
The shard holds only that. When a consumer deserializes a pull's result, the
ByReference turns back into the item: ray.get of an object in the local store, a
zero-copy read-only view for numpy arrays. The consumer sees the item itself.

The object belongs to the process that pushed it (Ray has no transfer of
ownership). If that process dies before the item is pulled, the item cannot be
read: the pull returns a pype.ItemLostError instance in its place (and logs a
warning); the other items of the pull arrive as usual.

Large means: a numpy array, bytes or bytearray of at least LARGE_ITEM bytes, at
the top level of an item or as a value of a dict item (as video frames are).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from pype.errors import ItemLostError

logger = logging.getLogger("pype")

LARGE_ITEM = 256 * 1024  # bytes

# False in shard processes: they keep references as they are and never fetch items.
_resolve_in_this_process = True


def keep_references_here() -> None:
    """Make this process (a shard) hold ByReference items without fetching them."""
    global _resolve_in_this_process
    _resolve_in_this_process = False


class ByReference:
    """A large item that lies in Ray's object store; see the module docstring."""

    __slots__ = ("nbytes", "ref")

    def __init__(self, ref: ray.ObjectRef, nbytes: int):
        self.ref = ref
        self.nbytes = nbytes

    def __reduce__(self):
        return _restore, (self.ref, self.nbytes)

    def __repr__(self) -> str:
        return f"<item of {self.nbytes / 1e6:.1f} MB in the object store>"


def _restore(ref: ray.ObjectRef, nbytes: int) -> Any:
    if not _resolve_in_this_process:
        return ByReference(ref, nbytes)
    return _fetch(ref, nbytes)


def _fetch(ref: ray.ObjectRef, nbytes: int) -> Any:
    try:
        return ray.get(ref)
    except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError) as error:
        # Raising here would fail the whole pull (Ray wraps it as a RaySystemError) and
        # lose the batch's other items: the lost item becomes an error value instead.
        lost = ItemLostError(f"an item of {nbytes / 1e6:.1f} MB was lost: the process that "
                             f"pushed it died before it was pulled ({type(error).__name__})")
        logger.warning("pype: %s", lost)
        return lost


_MAYBE_LARGE = (np.ndarray, bytes, bytearray, dict)


def _size(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    return 0


def by_reference(items: list) -> list:
    """`items` with their large parts put into the object store (see LARGE_ITEM)."""
    if not any(issubclass(kind, _MAYBE_LARGE) for kind in set(map(type, items))):
        return items  # the common case, no array, bytes or dict: one pass at C speed
    return [_by_reference(item) for item in items]


def _by_reference(item: Any) -> Any:
    size = _size(item)
    if size >= LARGE_ITEM:
        return ByReference(ray.put(item), size)
    if isinstance(item, dict) and any(_size(v) >= LARGE_ITEM for v in item.values()):
        return {k: _by_reference(v) for k, v in item.items()}
    return item


_PLAIN = frozenset((int, float, bool, str, bytes, type(None)))  # never hold a ByReference


def resolved(items: list) -> list:
    """`items` with every ByReference replaced by its item, fetched from the object store.

    A shard sends items by value over its data socket (pype.transport): a Ray
    ObjectRef pickled outside Ray's own calls would be pinned until its owner
    dies. For arrays the fetch is a zero-copy view of the object store's memory.
    """
    kinds = set(map(type, items))
    if kinds <= _PLAIN or not any(issubclass(kind, (ByReference, dict, tuple)) for kind in kinds):
        return items
    return [_resolve(item, 0) for item in items]


def _resolve(item: Any, depth: int) -> Any:
    """Leased items come as (lease_id, item, redelivered): one tuple level is looked into."""
    if isinstance(item, ByReference):
        return _fetch(item.ref, item.nbytes)
    if isinstance(item, dict) and any(isinstance(v, ByReference) for v in item.values()):
        return {k: _resolve(v, depth + 1) for k, v in item.items()}
    if type(item) is tuple and depth == 0 and any(isinstance(v, (ByReference, dict)) for v in item):
        return tuple(_resolve(v, depth + 1) for v in item)
    return item
