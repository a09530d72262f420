"""Storage brokers that drain streams to files (Zarr sinks). Not implemented yet."""
