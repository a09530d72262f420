"""Shuffle operators (DataFrame shuffle, hash join, Array rechunk) through streams.

Not implemented yet: the push-based shuffle is the next piece of work built on
the stream API (map tasks write shards into child streams, ``shuffle_streams``
is the barrier, unpack tasks read their partition locally).
"""
