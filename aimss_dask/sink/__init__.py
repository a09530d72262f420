"""Storage brokers that drain data to Zarr: ``to_zarr`` for arrays, ``Stream.to_zarr`` for streams."""
