"""Persistence: the state log interface and its SQLite and etcd backends, and the typed records kept in it."""
