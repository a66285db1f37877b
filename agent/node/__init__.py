"""One node's control loop: the pass runner (observe, plan, apply), the loop, its work queue and triggers, rollback,
status."""
