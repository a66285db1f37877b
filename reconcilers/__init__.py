"""One control loop per resource kind. Each: observe() -> actual, plan(desired, actual) -> actions (pure), apply."""
