"""Worker processes: pools (supervisor), command handlers, process information."""
