"""supervisor: spawns, watches, kills and respawns the processes of a run (no torch, no gymnasium)."""
