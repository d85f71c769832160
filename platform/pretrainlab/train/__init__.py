"""The Ray Train loop, its checkpoints, schedules and evaluation."""
