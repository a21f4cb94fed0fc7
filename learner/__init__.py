"""learner: replay, TD3 updates, weight broadcasts, metrics and checkpoints."""
