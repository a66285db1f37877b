"""Where bundles come from: a directory or a git repository (dulwich; a guard on the pack as it streams in),
commits checked against signatures (verify), each load held to the agent config's policy."""
