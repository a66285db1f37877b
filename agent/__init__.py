"""The node agent: CLI, the reconcile engine, the state log and the Docker side of the reconcilers."""
