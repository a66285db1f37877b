"""Notifications: what changed between two passes, as events (`events`, pure), and their delivery to the sinks the
config names (`sinks`: a signed JSON webhook, a Slack-compatible webhook, Apprise) on a thread of its own that
retries with backoff (`dispatch`) and never blocks a pass."""
