"""env-worker: steps one simulator, acts with a local actor, streams steps to the learner."""
