"""The node: the worker plugin, its log of streams, its run objects, the dedup of inputs."""
