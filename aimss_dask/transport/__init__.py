"""The transport: producers batch records to owners over the data plane (or Dask comms)."""
