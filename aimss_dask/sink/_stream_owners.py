"""The streaming sink's view of its stream's owners: what the coordinator says, the tasks pinned there.

:class:`Owners` asks the coordinator about the stream (fails with a named
error once the stream is destroyed or re-created), submits a round's tasks
pinned to each partition's owner, and collects them without ever waiting
unbounded on a worker that died. Which lost partitions still matter is
the driver's call (``check_lost``); so is cutting the array back after a
failed round (``cut_back``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aimss_dask.core.errors import SinkError, StreamNotFoundError
from aimss_dask.sink._stream_tasks import OwnerJob, trim_only

logger = logging.getLogger("aimss_dask")

#: How often a driver waiting on its tasks checks that their owners are alive.
LOST_CHECK = 1.0
#: How long a failed round waits for its other tasks before cutting the array
#: back (a task still writing must not land after the cut).
FAIL_GRACE = 30.0
#: How long a task whose result died with its worker may stay so before the
#: round fails, when the coordinator does not say its partition was lost.
LOST_RESULT_GRACE = 30.0


class Owners:
    """The stream's metadata and the owner tasks of one sink run."""

    def __init__(
        self,
        spec: Any,
        run: str,
        client: Any,
        ep: Any,
        check_lost: Callable[[Any, Any], None],
        cut_back: Callable[[], None],
    ) -> None:
        self.spec = spec
        self.run = run
        self.client = client
        self.ep = ep
        self._check_lost = check_lost
        self._cut_back = cut_back

    def client_closed(self) -> bool:
        return self.client.status not in ("running", "connecting", "newly-created")

    def info(self) -> dict[str, Any]:
        """The stream's info; raises if it is gone, re-created, or lost a partition that matters."""
        info = self._ask("info")["info"]
        if info["epoch"] != self.spec.epoch:
            raise SinkError(
                f"stream {self.spec.name!r} was destroyed and created again while its sink was running"
            )
        self._check_lost(info["lost"], ())
        return info

    def hold(self, group: str, offsets: list[list[int]]) -> None:
        """Commit ``offsets`` (``[partition, offset]`` pairs) as consumer group ``group``."""
        self._ask("commit", group=group, offsets=offsets)

    def _ask(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """The coordinator's answer to ``op`` about the stream; a named error once it is destroyed."""
        try:
            return self.ep.scheduler_op(op, name=self.spec.name, **kwargs)
        except StreamNotFoundError as e:
            raise SinkError(f"stream {self.spec.name!r} was destroyed while its sink was running") from e

    def submit(self, fn: Any, job: OwnerJob, kind: str, round_: int) -> Any:
        """``fn(job)`` on the owner of partition ``job.p``, and nowhere else."""
        return self.client.submit(
            fn,
            job,
            key=(f"zarr-sink-{kind}-{self.run[:12]}", round_, job.p),
            workers=[self.spec.owners[job.p]],
            allow_other_workers=False,
            pure=False,
        )

    def gather(self, futures: dict[int, Any]) -> dict[int, Any]:
        """Results of pinned tasks; on any failure, wait for the rest and cut back.

        Never an unbounded wait: a result held by a worker that just died is
        rescheduled on that (gone) worker and would never come back, so every
        wait is short and followed by a look at the lost partitions.
        """
        from distributed import wait

        results: dict[int, Any] = {}
        died: dict[int, float] = {}  # partition -> when its task's result was first seen lost
        try:
            while True:
                progress = False
                for p, f in futures.items():
                    if p in results:
                        continue
                    if f.status == "lost" and not self.client_closed():
                        # Its result died with its worker before it reached
                        # here. Dask runs the task again, pinned to that
                        # worker: never, if the partition died with it. The
                        # look at the lost partitions below names that.
                        if time.monotonic() - died.setdefault(p, time.monotonic()) > LOST_RESULT_GRACE:
                            raise SinkError(
                                f"the sink task of stream {self.spec.name!r} partition {p} lost its "
                                f"result with worker {self.spec.owners[p]}, and did not run again "
                                f"in {LOST_RESULT_GRACE:g} s"
                            )
                        continue
                    if f.status == "error":
                        try:
                            f.result()  # raises the task's exception
                        except StreamNotFoundError:
                            # Destroyed between the look at the stream and the task: say so.
                            self.info()
                            raise
                    if f.status in ("cancelled", "lost") or self.client_closed():
                        raise SinkError(
                            f"the sink of stream {self.spec.name!r} lost its tasks (its client closed?)"
                        )
                    if f.status == "finished":
                        try:
                            results[p] = f.result(timeout=LOST_CHECK)
                            progress = True
                        except TimeoutError:
                            pass
                if len(results) == len(futures):
                    return results
                # A lost result's event is cleared until it runs again: waited on like a pending one.
                pending = [f for p, f in futures.items() if p not in results and f.status in ("pending", "lost")]
                if pending and not progress:
                    try:
                        wait(pending, timeout=LOST_CHECK, return_when="FIRST_COMPLETED")
                        progress = True
                    except TimeoutError:
                        pass
                    except Exception:
                        pass  # cancelled futures: seen at the top of the loop
                if not progress:
                    self._check_lost(self._ask("get").get("lost"), futures)
        except BaseException:
            self._abort(futures)
            raise

    def _abort(self, futures: dict[int, Any]) -> None:
        """Let the round's other tasks end, then cut the array back to the commit."""
        from distributed import wait

        try:
            lost = set(self._ask("get").get("lost", ()))
        except Exception:
            lost = set(futures)
        alive = [f for p, f in futures.items() if p not in lost]
        for p in lost & set(futures):
            futures[p].cancel()  # pinned to a dead worker: would wait forever
        try:
            wait(alive, timeout=FAIL_GRACE)
        except Exception:
            pass
        try:
            self._cut_back()
        except Exception as e:
            logger.warning("aimss: sink of %r could not cut its array back after a failure: %r", self.spec.name, e)

    def trim(self, upto: dict[int, int]) -> None:
        """Free each partition's durable records below ``upto[p]`` on its owner; bounded wait."""
        from distributed import wait

        futs = [
            self.client.submit(
                trim_only,
                self.spec.name,
                self.spec.epoch,
                p,
                n,
                workers=[self.spec.owners[p]],
                allow_other_workers=False,
                pure=False,
            )
            for p, n in upto.items()
        ]
        # Bounded: an owner that dies now must not keep this thread.
        wait(futs, timeout=FAIL_GRACE)
