"""Where bundles come from: a directory or a git repository (dulwich), each held to the agent config's policy."""
