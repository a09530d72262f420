"""The public API of streams and runs, for clients and tasks."""
