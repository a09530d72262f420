"""The coordinator: the scheduler plugin, stream metadata, the registry of runs, pinning."""
