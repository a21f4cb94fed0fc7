"""The policy network that workers and the learner both run (torch; never imported by protocol or supervisor)."""
