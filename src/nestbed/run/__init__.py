"""Running tests in a testbed: dependencies, the in-testbed wrapper, verdicts."""
