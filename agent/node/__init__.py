"""One node's control loop: the pass runner (engine: observe, plan, apply), the loop with its work queue and
triggers, the control path the CLI calls (control), the policy check before every create and start (admission,
hostpaths), rollback, status, and what the page and the notifier read after each pass (page, notices)."""
