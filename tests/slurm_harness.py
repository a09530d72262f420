"""A real single-node Slurm for the tests, from Debian's packages (slurmctld, slurmd, slurm-client, munge).

:func:`start` writes a ``slurm.conf`` into a folder of its own, starts
``munged`` (unless one runs), ``slurmctld`` and ``slurmd`` by hand (no
systemd here), and waits until the node is idle; :func:`stop` stops what it
started and nothing else. Clients find the cluster through ``SLURM_CONF``.

Known pitfalls, each handled below:

- daemons bind to 0.0.0.0 unless ``CommunicationParameters`` says otherwise;
- a job without ``--mem`` takes the whole node unless ``DefMemPerCPU`` is set;
- more one-core workers than cores needs ``SlurmdParameters=config_overrides``;
- a dead daemon can linger as a zombie: :func:`_alive` reads ``/proc/PID/stat``.

Why it cannot start is a string (the tests skip with it), never an exception.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

#: Binaries the harness needs, with the Debian package that has each.
NEEDS = {
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "squeue": "slurm-client",
    "scancel": "slurm-client",
    "sinfo": "slurm-client",
    "munged": "munge",
}

#: CPUs the node offers: more than the machine's cores (one-core workers mostly wait).
CPUS = 8


@dataclass
class Slurm:
    """A running Slurm started by :func:`start`: its folder, config and the daemons to stop."""

    folder: str
    conf: str
    pids: dict[str, int] = field(default_factory=dict)
    env_before: str | None = None


def missing() -> str | None:
    """Why a Slurm cannot be started here; None if it can."""
    absent = sorted({pkg for exe, pkg in NEEDS.items() if shutil.which(exe) is None})
    if absent:
        return f"Slurm is not installed (apt install {' '.join(absent)})"
    if os.geteuid() != 0:
        return "starting slurmctld, slurmd and munged needs root"
    if not os.path.exists("/etc/munge/munge.key"):
        return "munge has no key (/etc/munge/munge.key); reinstall munge"
    return None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _pid_file(path: str, timeout: float = 15.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                pid = int(f.read().strip() or 0)
            if pid and _alive(pid):
                return pid
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.1)
    return None


def _munge_running() -> bool:
    try:
        out = subprocess.run(["pgrep", "-x", "munged"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(_alive(int(p)) for p in out.stdout.split())


def _conf(folder: str, host: str, memory_mb: int) -> str:
    return f"""\
ClusterName=aimss-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmdParameters=config_overrides
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
MpiDefault=none
KillWait=30
InactiveLimit=0
MinJobAge=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start(folder: str, timeout: float = 60.0) -> Slurm | str:
    """Start a single-node Slurm with its files in ``folder``; the handle, or why it could not."""
    why = missing()
    if why:
        return why
    host = socket.gethostname().split(".")[0]
    for port in (6817, 6818):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"port {port} is taken (another Slurm?); the tests start their own"
    os.makedirs(os.path.join(folder, "state"), exist_ok=True)
    os.makedirs(os.path.join(folder, "spool"), exist_ok=True)
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.75)
    conf = os.path.join(folder, "slurm.conf")
    with open(conf, "w") as f:
        f.write(_conf(folder, host, memory_mb))
    slurm = Slurm(folder=folder, conf=conf, env_before=os.environ.get("SLURM_CONF"))
    os.environ["SLURM_CONF"] = conf
    try:
        if not _munge_running():
            os.makedirs("/run/munge", exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            pid_file = "/run/munge/munged.pid"
            r = subprocess.run(["munged", "--force"], capture_output=True, text=True, timeout=30)
            if r.returncode:
                # munged refuses to run as root unless forced; as munge, it needs no force.
                r = subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "munged"], capture_output=True, text=True, timeout=30)
            pid = _pid_file(pid_file)
            if pid is None:
                stop(slurm)
                return f"munged did not start: {r.stderr.strip() or r.stdout.strip()}"
            slurm.pids["munged"] = pid
        for daemon, args in (("slurmctld", ["slurmctld", "-i", "-f", conf]), ("slurmd", ["slurmd", "-f", conf])):
            r = subprocess.run(args, capture_output=True, text=True, timeout=30)
            pid = _pid_file(os.path.join(folder, f"{daemon}.pid"))
            if pid is None:
                log = _tail(os.path.join(folder, f"{daemon}.log"))
                stop(slurm)
                return f"{daemon} did not start (rc {r.returncode}): {r.stderr.strip()} {log}"
            slurm.pids[daemon] = pid
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
            state = r.stdout.strip()
            if state.startswith("idle"):
                return slurm
            time.sleep(0.5)
        log = _tail(os.path.join(folder, "slurmd.log"))
        stop(slurm)
        return f"the Slurm node never became idle (sinfo says {state!r}): {log}"
    except (OSError, subprocess.SubprocessError) as e:
        stop(slurm)
        return f"Slurm could not start: {e!r}"


def _tail(path: str, n: int = 5) -> str:
    try:
        with open(path) as f:
            return " | ".join(f.read().splitlines()[-n:])
    except OSError:
        return ""


def stop(slurm: Slurm) -> None:
    """Cancel every job, then stop the daemons :func:`start` started (munged last)."""
    if "slurmctld" in slurm.pids:
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, timeout=30)
    for name in ("slurmd", "slurmctld", "munged"):
        pid = slurm.pids.pop(name, None)
        if pid is None:
            continue
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, 9)
    if slurm.env_before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = slurm.env_before
