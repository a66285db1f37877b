"""What a cluster decides once for all its nodes, as pure functions: the scheduler (slot assignments), and
`orchestrate` — desired state, one state snapshot and the nodes' observations in, each node's intent out
(assignments, published ports, rollout steps, rollback pins). No I/O: a node's pass (agent/node) observes,
commits and acts."""
