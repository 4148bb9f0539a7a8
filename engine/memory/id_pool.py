"""IdPool: a fixed set of ids (state slots), each free or held by one owner."""

from __future__ import annotations


class IdPool:
    """Ids 0..size-1 handed out low ids first. `what` names them in errors ("state slot")."""

    def __init__(self, what: str, size: int) -> None:
        if size < 1:
            raise ValueError(f"the {what} pool needs at least one, got {size}")
        self.what = what
        self.size = size
        self._free = list(range(size - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.size

    def allocate(self, count: int = 1) -> list[int]:
        if count > self.num_free:
            raise RuntimeError(f"{self.what} pool exhausted: need {count}, {self.num_free} free")
        return [self._free.pop() for _ in range(count)]

    def free(self, ids: list[int]) -> None:
        """Return ids (most recently allocated last) so they are handed out again first."""
        self._free.extend(reversed(ids))
