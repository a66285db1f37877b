"""Typed access to what the agent keeps in the state log: owner id, stack records, slot assignments."""

from __future__ import annotations

import json
import uuid

from agent.statelog import Compare, Delete, Put, StateLog
from schemas.state import Assignment, StackRecord

OWNER_KEY = "/meta/owner"
STACKS = "/stacks/"
ASSIGNMENTS = "/assignments/"


class Records:
    """The agent's records on a StateLog; writes happen only when a value actually changes."""

    def __init__(self, log: StateLog) -> None:
        self.log = log
        self._owner: str | None = None

    def owner(self, create: bool = True) -> str:
        """This state's owner id (label dabctl.owner); created once, atomically, on first use."""
        if self._owner is None:
            kv = self.log.get(OWNER_KEY)
            if kv is None and not create:
                # A state that never applied anything owns nothing: an id no object carries.
                self._owner = "none-" + uuid.uuid4().hex[:11]
                return self._owner
            if kv is None:
                fresh = uuid.uuid4().hex[:16]
                self.log.txn([Compare(OWNER_KEY, "create_revision", "==", 0)], [Put(OWNER_KEY, fresh.encode())])
                kv = self.log.get(OWNER_KEY)
            assert kv is not None
            self._owner = kv.value.decode()
        return self._owner

    def stacks(self) -> dict[str, StackRecord]:
        out = {}
        for kv in self.log.range(STACKS):
            rec = StackRecord.model_validate_json(kv.value)
            out[rec.stack] = rec
        return out

    def put_stack(self, record: StackRecord) -> None:
        self.log.put(STACKS + record.stack, record.model_dump_json().encode())

    def delete_stack(self, stack: str) -> None:
        self.log.txn([], [Delete(STACKS + stack), Delete(f"{ASSIGNMENTS}{stack}/", prefix=True)])

    def assignments(self) -> dict[tuple[str, str], dict[str, list[str]]]:
        out = {}
        for kv in self.log.range(ASSIGNMENTS):
            stack, _, service = kv.key.removeprefix(ASSIGNMENTS).partition("/")
            out[(stack, service)] = Assignment.model_validate_json(kv.value).nodes
        return out

    def write_assignments(
        self, changed: dict[tuple[str, str], dict[str, list[str]]], removed: set[tuple[str, str]]
    ) -> None:
        """Write changed and delete removed assignments in one transaction (nothing when both are empty)."""
        ops: list[Put | Delete] = [
            Put(f"{ASSIGNMENTS}{stack}/{service}", json.dumps({"nodes": nodes}, sort_keys=True).encode())
            for (stack, service), nodes in sorted(changed.items())
        ]
        ops += [Delete(f"{ASSIGNMENTS}{stack}/{service}") for stack, service in sorted(removed)]
        if ops:
            self.log.txn([], ops)
