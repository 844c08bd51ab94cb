"""Stage 3 on datatrove's Slurm executor, against a real single-node Slurm cluster.

The module starts munged, slurmctld and slurmd from Debian's packages (`make slurm` installs
them) on the loopback, with their config, key, state and logs in a temporary directory, and
stops them afterwards. Without the packages, or when the daemons do not come up, the tests fail
with the reason: they never skip.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import test_dedup_datatrove
from test_dedup_datatrove import BASE, _outcome

from data_contracts.config import DedupConfig, DedupSlurmConfig
from data_contracts.manifest import Manifest
from tasks.dedup import run_dedup
from tasks.dedup_datatrove import WorkDir, run_datatrove

# The datatrove tests' corpus and its in-process reference, as fixtures of this module too.
corpus, in_process = test_dedup_datatrove.corpus, test_dedup_datatrove.in_process

# Slow: ~1.5-2 min, mostly waiting on the Slurm jobs (each a Python start); under `make test`'s
# workers it starts with the other long modules.
pytestmark = pytest.mark.slow

PARTITION = "ftflow"
DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_conf(root: Path) -> str:
    """One node (this machine, 2 CPUs, on 127.0.0.1), one partition, no accounting database,
    no cgroups (proctrack/linuxproc, task/none: this machine may be a container), every path
    under root. SlurmctldHost must be this host's short name: slurmctld refuses to run elsewhere."""
    user = getpass.getuser()
    return f"""\
ClusterName=ftflow-test
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=4096 State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _tail(root: Path) -> str:
    return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                     for log in sorted((root / "log").glob("*")))


def _daemons_since(since: float) -> list[psutil.Process]:
    """Slurm and munge daemons (and job steps) started after `since` that are still alive."""
    return [p for p in psutil.process_iter(["name", "create_time"])
            if p.info["name"] in DAEMONS and p.info["create_time"] >= since - 1]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):  # slurmd, slurmctld, then munged
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[Path]:
    """A single-node cluster: munged with a fresh key, slurmctld and slurmd in the foreground
    (-D), SLURM_CONF pointing every Slurm command of this process and its jobs at it."""
    missing = [cmd for cmd in COMMANDS if not shutil.which(cmd)]
    if missing:
        pytest.fail(f"Slurm not installed here (no {', '.join(missing)}): run `make slurm` "
                    "(apt-get install slurmctld slurmd slurm-client munge)", pytrace=False)
    started = time.time()
    # munged wants its socket's directory searchable by all, its key's private to it.
    root = Path(tempfile.mkdtemp(prefix="ftflow-slurm-"))
    root.chmod(0o755)
    for name, mode in (("munge", 0o755), ("munge-key", 0o700), ("state", 0o700),
                       ("spool", 0o755), ("log", 0o755)):
        (root / name).mkdir(mode=mode)
    key = root / "munge-key" / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root))
    commands = [
        ["munged", "-F", f"--key-file={key}", f"--socket={root}/munge/munge.socket",
         f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge-key/munged.seed",
         f"--log-file={root}/log/munged.log"],
        ["slurmctld", "-D", "-f", str(conf)],
        ["slurmd", "-D", "-N", "localhost", "-f", str(conf)],
    ]
    procs: list[subprocess.Popen] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))
        try:
            for cmd in commands:
                with (root / "log" / f"{cmd[0]}.out").open("w") as out:
                    procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
                if cmd[0] == "munged":
                    _wait_for(lambda: (root / "munge" / "munge.socket").exists(), procs, root)
            _wait_for(lambda: subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True
            ).stdout.split() == ["idle"], procs, root)
            yield root
        finally:
            subprocess.run(["scancel", f"--user={getpass.getuser()}"], capture_output=True)
            _stop(procs)
    deadline = time.monotonic() + 20
    while (left := _daemons_since(started)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the test cluster still alive after teardown: {left}"
    shutil.rmtree(root)


def _wait_for(ready, procs: list[subprocess.Popen], root: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not ready after {timeout:.0f} s"
            pytest.fail(f"single-node Slurm cluster did not start ({why}):\n{_tail(root)}",
                        pytrace=False)
        time.sleep(0.5)


def _jobs(job_ids: list[str]) -> list[dict[str, str]]:
    """scontrol's record of each job (one per array task), while slurmctld still holds it."""
    out = "".join(subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                                 text=True, check=True).stdout for job_id in job_ids)
    return [dict(field.split("=", 1) for field in line.split() if "=" in field)
            for line in out.splitlines()]


def _slurm_cfg(**kw) -> DedupConfig:
    # One array job per datatrove stage (tasks_per_job): each job pays a Python start.
    slurm = DedupSlurmConfig(partition=PARTITION, time="00:10:00", mem_per_cpu_gb=1,
                             tasks_per_job=16, poll_s=1)
    return DedupConfig(**{**BASE, "executor": "slurm", "slurm": slurm, **kw})


def test_slurm_removes_what_in_process_removes(
        slurm_cluster: Path, corpus: Path, in_process: Path, tmp_path: Path, home: Path):
    out, work, seen = tmp_path / "03-dedup", tmp_path / "scratch", tmp_path / "seen"
    seen.mkdir()
    # Each job records the python it runs (the venv's, from the activate script it sources).
    env = (f"source {sys.prefix}/bin/activate; "
           f'echo "$VIRTUAL_ENV $(command -v python)" > {seen}/$SLURM_ARRAY_JOB_ID')
    cfg = _slurm_cfg(tasks=2, work_dir=str(work))
    cfg = cfg.model_copy(update={"slurm": cfg.slurm.model_copy(update={"env_command": env})})
    m = run_dedup(corpus, out, cfg, home=home).check()
    assert _outcome(out) == _outcome(in_process)
    local = Manifest.read(in_process)
    assert (m.records_in, m.kept, m.deduplicated, m.splits) == (
        local.records_in, local.kept, local.deduplicated, local.splits)
    assert m.info["executor"] == "slurm"
    # The four stages ran as four sbatch array jobs (no merge-stats jobs), each to completion.
    job_ids = m.info["slurm_jobs"].split(",")
    jobs = _jobs(job_ids)
    assert [job["JobName"] for job in jobs] == [
        f"ftflow-dedup-{stage}" for stage in ("signatures", "buckets", "clusters", "filter")]
    assert {(job["JobState"], job["ExitCode"], job["Partition"]) for job in jobs} == {
        ("COMPLETED", "0:0", PARTITION)}
    assert [job["ArrayJobId"] for job in jobs] == job_ids
    ran = {path.name: path.read_text().split() for path in seen.iterdir()}
    assert sorted(ran) == sorted(job_ids)
    for venv, python in ran.values():
        assert Path(venv).resolve() == Path(sys.prefix).resolve() and python == f"{venv}/bin/python"
    assert not any(work.iterdir())  # the scratch went once the stage was written


def test_slurm_stage_failure_fails_the_run_and_cancels_the_jobs_waiting(
        slurm_cluster: Path, tmp_path: Path):
    # A shard that is no gzip: the signature job fails, and the jobs after it would wait on it
    # forever (DependencyNeverSatisfied) if the stage did not cancel them.
    work = WorkDir(tmp_path / "work")
    work.shards.mkdir(parents=True)
    with (work.shards / "00000.jsonl.gz").open("wb") as fh:
        fh.write(b"not gzip\n")
    with pytest.raises(RuntimeError, match=r"stage signatures: tasks \[0\] did not complete; "
                                           r"see .*/logs/signatures/logs and .*/slurm_logs"):
        run_datatrove(_slurm_cfg(tasks=1), work)
    queued = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True,
                            text=True, check=True).stdout
    assert queued == ""
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True,
                          text=True, check=True).stdout.split()
    assert node == ["idle"]  # a failed job leaves the node in service
    (job_log,) = work.root.glob("logs/signatures/slurm_logs/*.out")  # the job's own output
    assert "Not a gzipped file" in job_log.read_text()
