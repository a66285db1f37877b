"""The agent's HTTP: the server (probes, metrics, status, webhook, control calls) and the CLI's client for it."""
