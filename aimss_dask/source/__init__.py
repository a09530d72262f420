"""Storage brokers that fill streams from files (prefetching sources). Not implemented yet."""
