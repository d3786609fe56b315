"""The run planner: memory per device, disk and time of every stage, from the target's config.json alone."""
