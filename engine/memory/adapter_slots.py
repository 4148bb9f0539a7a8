"""AdapterSlots: the fixed pool of GPU adapter slots, with pins and LRU eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class AdapterSlots:
    """Maps adapter keys to slot indices 0..S-1.

    A slot with pins > 0 serves running sequences and is never evicted. Unpinned occupied slots
    are kept (a later request reuses them without a copy) in LRU order and evicted oldest first
    when a new adapter needs a slot.
    """

    def __init__(self, num_slots: int) -> None:
        self.key_of: list[Hashable | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self._slot_of: dict[Hashable, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # occupied, unpinned, LRU first

    def lookup(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    @property
    def num_used(self) -> int:
        return len(self._slot_of)

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1
        self._idle.pop(slot, None)

    def unpin(self, slot: int) -> None:
        assert self.pins[slot] > 0, f"slot {slot} is not pinned"
        self.pins[slot] -= 1
        if self.pins[slot] == 0:
            self._idle[slot] = None

    def take(self) -> tuple[int, Hashable | None] | None:
        """A slot for a new adapter: an empty one, else the LRU idle one (returns its old key)."""
        for slot, key in enumerate(self.key_of):
            if key is None:
                return slot, None
        if not self._idle:
            return None
        slot, _ = self._idle.popitem(last=False)
        old = self.key_of[slot]
        self.release(slot)
        return slot, old

    def assign(self, slot: int, key: Hashable) -> None:
        assert self.key_of[slot] is None, f"slot {slot} is occupied"
        self.key_of[slot] = key
        self._slot_of[key] = slot
        self._idle[slot] = None

    def release(self, slot: int) -> None:
        """Empty an unpinned slot."""
        assert self.pins[slot] == 0, f"slot {slot} is pinned"
        key = self.key_of[slot]
        if key is not None:
            del self._slot_of[key]
        self.key_of[slot] = None
        self._idle.pop(slot, None)

    def idle_slots(self) -> list[int]:
        return list(self._idle)
