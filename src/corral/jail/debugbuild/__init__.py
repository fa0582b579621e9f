"""Present in the source tree, absent from the wheel (pyproject.toml excludes this package): its
presence is the build-time half of the debug-hook switch (corral.jail.debug)."""

DEBUG_HOOKS = True
