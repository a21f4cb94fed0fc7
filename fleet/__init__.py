"""The fleet on Ray: what runs on each host's node (its agent) and the run's registry (``fleet.agent``)."""
