"""aimss_dask: an Active In-Memory Storage System inside Dask.

Register the plugin once and the workers become in-memory stream stores::

    from distributed import Client
    import aimss_dask

    client = Client()
    client.register_plugin(aimss_dask.AIMSS())
    s = aimss_dask.create_stream("events", partitions=4)
"""

from aimss_dask.api.filling import Filler, fill, sync_phase
from aimss_dask.api.power import PowerReport, power_report
from aimss_dask.api.speculative import speculative
from aimss_dask.api.streams import (
    ClusterStatus,
    Stream,
    create_stream,
    destroy_stream,
    get_stream,
    read_from,
    shuffle_streams,
    status,
    write_to,
)
from aimss_dask.api.tracing import Trace, trace
from aimss_dask.coordinator import dashboard as _dashboard
from aimss_dask.coordinator.plugin import AIMSS
from aimss_dask.core.config import AIMSSConfig
from aimss_dask.core.errors import (
    AIMSSError,
    DuplicateOriginError,
    InvalidArgumentError,
    InvalidOffsetError,
    InvalidTypeError,
    MissingDependencyError,
    NotRegisteredError,
    PartitionLostError,
    PartitionNotHeldError,
    PartitionOutOfRangeError,
    PushesPendingError,
    ReadTimeoutError,
    RecordNotSerializableError,
    RunNotFoundError,
    SinkError,
    SpillCorruptionError,
    SpillError,
    StoreNotFoundError,
    StoreReadOnlyError,
    StreamExistsError,
    StreamNotFoundError,
    StreamPermissionError,
    StreamSealedError,
    WorkerClosingError,
    WriteOrderError,
)
from aimss_dask.shuffle import merge, rechunk, shuffle
from aimss_dask.sink.array import to_zarr
from aimss_dask.sink.stream_sink import Sink
from aimss_dask.source import from_zarr

__version__ = "0.1.0"

# Schedulers made in this process from now on show the AIMSS dashboard pages.
_dashboard.enable()

__all__ = [
    "AIMSS",
    "AIMSSConfig",
    "AIMSSError",
    "ClusterStatus",
    "DuplicateOriginError",
    "Filler",
    "InvalidArgumentError",
    "InvalidOffsetError",
    "InvalidTypeError",
    "MissingDependencyError",
    "NotRegisteredError",
    "PartitionLostError",
    "PartitionNotHeldError",
    "PartitionOutOfRangeError",
    "PowerReport",
    "PushesPendingError",
    "ReadTimeoutError",
    "RecordNotSerializableError",
    "RunNotFoundError",
    "Sink",
    "SinkError",
    "SpillCorruptionError",
    "SpillError",
    "StoreNotFoundError",
    "StoreReadOnlyError",
    "StreamPermissionError",
    "Stream",
    "StreamExistsError",
    "StreamNotFoundError",
    "StreamSealedError",
    "Trace",
    "WorkerClosingError",
    "WriteOrderError",
    "create_stream",
    "destroy_stream",
    "fill",
    "from_zarr",
    "get_stream",
    "merge",
    "power_report",
    "read_from",
    "rechunk",
    "shuffle",
    "shuffle_streams",
    "trace",
    "speculative",
    "status",
    "sync_phase",
    "to_zarr",
    "write_to",
]
