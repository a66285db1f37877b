"""Persistence: the state log interface and its SQLite and etcd backends, the typed records kept in it, and the
lock files that name their holder (one writer per state, one agent per state directory)."""
