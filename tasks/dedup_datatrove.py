"""Stage 3 on datatrove's MinHash pipeline, for corpora beyond one machine.

The contract of tasks.dedup.run_dedup (same stage directory, held-out carve, removal kinds,
every removed record naming the kept one it duplicates), with the all-pairs work done by
datatrove's four MinHash steps on the executor `dedup.executor` names:

    datatrove -> LocalPipelineExecutor  (processes on this machine)
    slurm     -> SlurmPipelineExecutor  (sbatch array jobs; work_dir must be on a shared disk)
    ray       -> RayPipelineExecutor    (ray.address, or a local cluster started for the stage)

1. Driver: stream the input once, writing the texts as datatrove JSONL shards (doc id = the
   record's stream position, the index run_dedup uses too) and choosing the held-out split.
2. datatrove: signatures (on our shingles) -> buckets -> clusters (save_cluster_id) -> filter
   (load_cluster_ids). Every doc that landed in a cluster is written out with its cluster id:
   the one datatrove keeps and those it drops.
3. Driver: datatrove keeps each cluster's union-find root, and its clusters are transitive
   (A~B and B~C put A and C together). So each cluster is replayed through
   tasks.dedup_common.decide: held-out first, first seen kept, each member confirmed by the exact
   Jaccard against the kept ones. A removed record thus names the record it truly duplicates, as
   in process.
4. Driver: stream the input again and write the stage through StageWriter.

num_perm -> MinhashConfig: datatrove's LSH is num_buckets bands of hashes_per_bucket hashes.
We take the bands x rows datasketch's MinHashLSH picks for num_perm at the candidate floor
min(candidate_threshold, threshold), i.e. the in-process banding (num_perm 128 at 0.7: 14 x 9,
126 hashes used), and the in-process signatures themselves (tasks.dedup_sketch: datasketch's
32-bit MinHash on the same shingle hashes), so two records share a bucket exactly when the
in-process LSH pairs them.
With datatrove's own permutations the two paths missed different pairs (the LSH misses ~4% of
pairs at Jaccard 0.84), and removed different records. Candidates are then confirmed at
`threshold` exactly, as in process.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig

from data_contracts.config import DedupConfig, DedupRayConfig
from data_contracts.manifest import Manifest
from data_contracts.records import ChatSample
from tasks.dedup_common import (
    HeldoutCarver,
    Removal,
    can_hold_out,
    candidate_lsh,
    decide,
    match_form,
    stage_info,
    stream_input,
    text_sigs,
    write_stage,
)
from tasks.dedup_sketch import minhash_matrix
from tasks.stage_dir import StageDir

logger = logging.getLogger(__name__)

Member = tuple[int, str, str]  # (stream position, record id, text) of one clustered record


def minhash_config(cfg: DedupConfig) -> MinhashConfig:
    """datatrove's LSH for cfg: num_perm as the bands x rows datasketch uses in process."""
    lsh = candidate_lsh(cfg)
    return MinhashConfig(n_grams=cfg.ngram, num_buckets=lsh.bands, hashes_per_bucket=lsh.rows,
                         hash_config=HashConfig(precision=32))  # datasketch's hash width


class ShingleSignature(MinhashDedupSignature):
    """datatrove's signature step on ftflow's shingles (tasks.dedup_common.match_form) and the
    in-process MinHash of them.

    The shingles are the sets the exact Jaccard is computed on, so exact duplicates always
    share every bucket; and a text shorter than n words is one shingle (datatrove's own
    shingling gives it none, so it would never be deduplicated).
    """

    name = "🎯 MinHash stage 1 (ftflow shingles)"

    def __init__(self, output_folder: str, config: MinhashConfig, num_perm: int) -> None:
        super().__init__(output_folder, config=config)
        self.num_perm = num_perm

    def get_shingles(self, text: str) -> np.ndarray:
        _, grams = match_form(text, self.config.n_grams)
        return grams.astype(np.uint64).reshape(-1, 1)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        """The bands of the in-process signature: its num_perm hash values, of which the first
        num_buckets x hashes_per_bucket, as the in-process LSH cuts them into bands."""
        grams = shingles.ravel()
        (sig,) = minhash_matrix(grams, np.array([0, grams.size]), self.num_perm)
        used = sig[: self.num_hashes].astype(self.config.hash_config.np_dtype)
        return [band.tolist() for band in np.split(used, self.config.num_buckets)]


class KeepClustered(PipelineStep):
    """Passes on only the docs the cluster step put in a cluster: all the driver reads back."""

    type = "🫂 - DEDUP"
    name = "🎯 clustered docs"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("total")
            if doc.metadata.get("minhash_cluster_id", -1) != -1:
                self.stat_update("clustered")
                yield doc


class DefaultSigterm(PipelineStep):
    """First step of every Ray stage: the process running the rank dies on SIGTERM again.

    datatrove's RankWorker runs its ranks in a fork()ed multiprocess Pool, whose children
    inherit Ray's Python SIGTERM handler. Python runs handlers in the main thread only, so when
    the SIGTERM of Pool.terminate lands on another thread of a child (fsspec's IO thread, which
    the rank's file reads start), the child sleeps on in the pool's queue lock, and the actor,
    joining it, hangs the stage for good (seen here on 2 cores: one run in six).
    """

    type = "🔧 - SETUP"
    name = "🔧 default SIGTERM"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        # Not a generator: it must act when the pipeline is built, also before steps that
        # never read their input (buckets, clusters).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return data


@dataclass(frozen=True)
class WorkDir:
    """The scratch of one run: shards, signatures, buckets, cluster files and datatrove logs."""

    root: Path

    @property
    def shards(self) -> Path:
        return self.root / "input"

    @property
    def remove(self) -> Path:
        return self.root / "remove"

    @property
    def clusters(self) -> Path:
        return self.root / "clusters"

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def work_dir(cfg: DedupConfig, out_dir: str | Path, key: str) -> WorkDir:
    """<work_dir or out_dir/_datatrove>/<key>: a relaunch with the same input and config finds
    its finished datatrove tasks (completion markers) there; another config starts afresh."""
    base = Path(cfg.work_dir) if cfg.work_dir else Path(out_dir) / "_datatrove"
    return WorkDir(base / key)


def _stages(cfg: DedupConfig, work: WorkDir) -> list[tuple[str, list[PipelineStep], int]]:
    """(name, steps, tasks) of the four datatrove stages."""
    mh = minhash_config(cfg)
    sigs, buckets = work / "signatures", work / "buckets"

    def shards() -> JsonlReader:
        return JsonlReader(str(work.shards), glob_pattern="*.jsonl.gz")

    return [
        ("signatures", [shards(), ShingleSignature(str(sigs), mh, cfg.num_perm)], cfg.tasks),
        ("buckets", [MinhashDedupBuckets(str(sigs), str(buckets), config=mh)], mh.num_buckets),
        ("clusters", [MinhashDedupCluster(str(buckets), str(work.remove), config=mh,
                                          save_cluster_id=True)], 1),
        ("filter", [shards(),
                    MinhashDedupFilter(str(work.remove), load_cluster_ids=True,
                                       exclusion_writer=JsonlWriter(str(work.clusters / "removed"))),
                    KeepClustered(), JsonlWriter(str(work.clusters / "kept"))], cfg.tasks),
    ]


def _venv_activate() -> str:
    """This interpreter's venv activate script, for Slurm jobs to source ("" if none)."""
    script = Path(sys.prefix) / "bin" / "activate"
    return str(script) if script.exists() else ""


def _preload_forkserver() -> None:
    """datatrove's local pools fork their workers from a forkserver, a fresh interpreter: with
    this module preloaded there, no worker of any stage imports it again (prefect, datasketch,
    datatrove: ~4 s per worker on 2 cores). No effect once the forkserver has started."""
    import multiprocess

    multiprocess.get_context("forkserver").set_forkserver_preload([__name__])


class SlurmJobIds:
    """datatrove's job_id_retriever, recording every job sbatch queued: an executor keeps only
    the last of its array jobs (one per max_array_size tasks)."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def __call__(self, sbatch_output: str) -> str:
        job_id = sbatch_output.split()[-1]  # "Submitted batch job <id>"
        self.ids.append(job_id)
        return job_id


class StageSlurmExecutor(SlurmPipelineExecutor):
    """datatrove's Slurm executor without its merge-stats job. That job runs after the stage
    it summarizes, once run_dedup_datatrove may have removed the scratch: on a real cluster it
    then failed, and the stats it writes are never read."""

    def launch_merge_stats(self) -> None:
        pass


def build_executors(cfg: DedupConfig, work: WorkDir,
                    slurm_jobs: SlurmJobIds | None = None) -> dict[str, PipelineExecutor]:
    """One executor per datatrove stage, in order, of the kind cfg.executor names. Slurm ones
    are chained with `depends`, so submitting the last queues all four (sbatch dependencies);
    slurm_jobs records their job ids."""
    slurm_jobs = slurm_jobs if slurm_jobs is not None else SlurmJobIds()
    executors: list[PipelineExecutor] = []
    names = []
    for name, steps, tasks in _stages(cfg, work):
        names.append(name)
        logs = str(work / "logs" / name)
        if cfg.executor == "datatrove":
            workers = min(cfg.workers or os.cpu_count() or 1, tasks)
            executors.append(LocalPipelineExecutor(steps, tasks=tasks, workers=workers,
                                                   logging_dir=logs))
        elif cfg.executor == "ray":
            r = cfg.ray
            executors.append(RayPipelineExecutor(
                [DefaultSigterm(), *steps], tasks=tasks, workers=cfg.workers or -1, logging_dir=logs,
                cpus_per_task=r.cpus_per_task, mem_per_cpu_gb=r.mem_per_cpu_gb,
                tasks_per_job=r.tasks_per_job))
        elif cfg.executor == "slurm":
            s = cfg.slurm
            executors.append(StageSlurmExecutor(
                steps, tasks=tasks, workers=cfg.workers or -1, logging_dir=logs,
                partition=s.partition, time=s.time, cpus_per_task=s.cpus_per_task,
                mem_per_cpu_gb=s.mem_per_cpu_gb, qos=s.qos, job_name=f"{s.job_name}-{name}",
                venv_path=s.venv_path or _venv_activate(), env_command=s.env_command or None,
                sbatch_args=dict(s.sbatch_args),
                tasks_per_job=s.tasks_per_job, job_id_retriever=slurm_jobs,
                depends=executors[-1] if executors else None))
        else:
            raise ValueError(f"dedup.executor {cfg.executor!r} does not run on datatrove")
    return dict(zip(names, executors, strict=True))


def _export(input_path: str | Path, work: WorkDir, cfg: DedupConfig,
            seed: int) -> tuple[set[int], bool]:
    """Write the records' texts as cfg.tasks shards (round-robin by stream position) and choose
    the held-out split as they pass: (held-out positions, reused an existing split?)."""
    carver = HeldoutCarver(cfg, seed)
    work.shards.mkdir(parents=True, exist_ok=True)
    files = [gzip.open(work.shards / f"{r:05d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1)
             for r in range(cfg.tasks)]
    try:
        idx = 0
        for origin, rec in stream_input(input_path):
            if not isinstance(rec, ChatSample):
                continue
            carver.add(idx, origin, rec.id, can_hold_out(rec))
            # datatrove's reader skips empty texts; " " normalizes to "" like an empty one.
            doc = {"id": str(idx), "text": rec.joined_text() or " ", "rid": rec.id}
            files[idx % cfg.tasks].write(json.dumps(doc, ensure_ascii=False) + "\n")
            idx += 1
    finally:
        for fh in files:
            fh.close()
    return carver.split()


def _prepare_filter_inputs(work: WorkDir, tasks: int) -> None:
    """An empty .remove and .clusters file for every rank. The cluster step writes them only
    for ranks that hold cluster members, and without a .remove file datatrove's filter skips
    loading cluster ids, so a rank holding only kept roots would lose theirs."""
    work.remove.mkdir(parents=True, exist_ok=True)
    for rank in range(tasks):
        for ext in ("remove", "clusters"):
            (work.remove / f"{rank:06d}.{ext}").touch()


_RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's multi-host switch off while a local cluster runs, so its node IP is 127.0.0.1 and
    the GCS, raylet and workers listen on the loopback, not on the host's address.

    Ray reads the environment variable once, on import (ray_constants), and ray may have been
    imported before this stage, so the constant is switched too. Both are restored afterwards:
    a driver that takes 127.0.0.1 for its IP could not join a remote cluster later.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_RAY_CLUSTER_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTER_SWITCH] = "0"  # inherited by the GCS, raylet and workers
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_RAY_CLUSTER_SWITCH, None)
        else:
            os.environ[_RAY_CLUSTER_SWITCH] = saved_env


@contextmanager
def _ray_session(rcfg: DedupRayConfig) -> Iterator[dict[str, str]]:
    """The Ray cluster the executor runs on: the caller's, when ray is initialized already;
    rcfg.address when set; else a local one started for the stage on 127.0.0.1, then stopped."""
    import ray

    if ray.is_initialized():
        yield {"ray_cluster": "existing", "ray_node_ip": ray.util.get_node_ip_address()}
        return
    if rcfg.address:
        ray.init(address=rcfg.address, log_to_driver=False)
        try:
            yield {"ray_cluster": rcfg.address, "ray_node_ip": ray.util.get_node_ip_address()}
        finally:
            ray.shutdown()
        return
    with _loopback_only():
        try:
            ray.init(address="local", num_cpus=rcfg.num_cpus, include_dashboard=False,
                     log_to_driver=False)
            yield {"ray_cluster": "local", "ray_node_ip": ray.util.get_node_ip_address()}
        finally:
            ray.shutdown()  # also after a failed init, which can leave processes behind


def _check_complete(executor: PipelineExecutor, name: str) -> None:
    """Raise unless every task left its completion marker (Ray only logs failed tasks)."""
    missing = executor.get_incomplete_ranks()
    if missing:
        logs = f"{executor.logging_dir.path}/logs"
        if isinstance(executor, SlurmPipelineExecutor):  # the jobs' own output, shell included
            logs += f" and {executor.slurm_logs_folder}"
        raise RuntimeError(f"datatrove dedup stage {name}: tasks {missing} did not complete; "
                           f"see {logs}")


def _squeue(jobs: list[str]) -> list[tuple[str, str, str]] | None:
    """(job id, state, reason) of the jobs Slurm still lists (finished ones it drops); None when
    squeue could not tell (controller busy or restarting)."""
    proc = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i|%T|%r"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # all purged from the controller: none queued
            return []
        logger.warning("squeue failed (%s); polling on", proc.stderr.strip())
        return None
    return [tuple(line.split("|", 2)) for line in proc.stdout.splitlines() if line]


def _wait_for_slurm(executors: dict[str, PipelineExecutor], jobs: list[str], poll_s: int) -> None:
    """Block until Slurm no longer lists the jobs, then fail unless every task of every stage
    left its completion marker.

    Not done at the last marker: a job still runs (and writes its log) for a moment after it,
    and the stage is about to remove the scratch. And as soon as a job waits on one that failed
    (reason DependencyNeverSatisfied, which Slurm would keep queued forever), the jobs left are
    cancelled and the stage fails.
    """
    while True:
        queued = _squeue(jobs) if jobs else []
        if queued is not None:
            stuck = [job for job, _, reason in queued if reason == "DependencyNeverSatisfied"]
            if stuck:
                subprocess.run(["scancel", *jobs], check=False)
                logger.error("dedup: Slurm jobs %s wait on a failed one; cancelled", stuck)
            if stuck or not queued:
                for name, ex in executors.items():
                    _check_complete(ex, name)
                return
        time.sleep(poll_s)


def _run_in_order(executors: dict[str, PipelineExecutor]) -> None:
    for name, executor in executors.items():
        executor.run()
        _check_complete(executor, name)


def run_datatrove(cfg: DedupConfig, work: WorkDir) -> dict[str, str]:
    """Run the four stages on cfg.executor, each to completion; returns facts for the manifest."""
    slurm_jobs = SlurmJobIds()
    executors = build_executors(cfg, work, slurm_jobs)
    _prepare_filter_inputs(work, cfg.tasks)
    if cfg.executor == "datatrove":
        _preload_forkserver()
    if cfg.executor == "slurm":
        executors["filter"].run()  # submits the whole chain
        logger.info("dedup: Slurm jobs %s queued", ",".join(slurm_jobs.ids))
        _wait_for_slurm(executors, slurm_jobs.ids, cfg.slurm.poll_s)
        return {"slurm_jobs": ",".join(slurm_jobs.ids)}
    if cfg.executor == "ray":
        with _ray_session(cfg.ray) as facts:
            _run_in_order(executors)
        return facts
    _run_in_order(executors)
    return {}


CLUSTER_PARTS = 16  # the replay holds one part of the clustered docs in memory at a time


def partition_clusters(work: WorkDir, parts: int = CLUSTER_PARTS) -> tuple[list[Path], int]:
    """datatrove's clustered docs (the ones it keeps and those it drops) spilled into `parts`
    files by cluster id, so that replaying them needs memory for one part, not for every
    duplicate of the corpus; and how many members datatrove's filter itself dropped."""
    part_dir = work / "cluster-parts"
    part_dir.mkdir(parents=True, exist_ok=True)
    paths = [part_dir / f"{i:04d}.jsonl" for i in range(parts)]
    files = [path.open("w", encoding="utf-8") for path in paths]
    dropped = 0
    try:
        for part in ("kept", "removed"):
            for path in sorted((work.clusters / part).glob("*.jsonl.gz")):
                with gzip.open(path, "rt", encoding="utf-8") as fh:
                    for line in fh:
                        doc = json.loads(line)
                        meta = doc["metadata"]
                        cid = meta["minhash_cluster_id"]
                        row = [cid, int(doc["id"]), meta["rid"], doc["text"]]
                        files[cid % parts].write(json.dumps(row, ensure_ascii=False) + "\n")
                        dropped += part == "removed"
    finally:
        for fh in files:
            fh.close()
    return paths, dropped


def iter_clusters(paths: list[Path]) -> Iterator[list[Member]]:
    """Each cluster's members in stream order, one partition file in memory at a time."""
    for path in paths:
        clusters: dict[int, list[Member]] = defaultdict(list)
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                cid, idx, rid, text = json.loads(line)
                clusters[cid].append((idx, rid, text))
        for members in clusters.values():
            yield sorted(members)


def decide_clusters(clusters: Iterable[list[Member]], heldout_idx: set[int],
                    cfg: DedupConfig) -> tuple[dict[int, Removal], int, int]:
    """Per cluster, tasks.dedup_common.decide with every kept member as a candidate: the removals by
    stream position, each naming the id of the record it duplicates; and how many clusters
    and members there were."""
    removed: dict[int, Removal] = {}
    n_clusters = n_members = 0
    for members in clusters:
        n_clusters, n_members = n_clusters + 1, n_members + len(members)
        sigs = text_sigs([(rid, text) for _, rid, text in members], cfg.ngram)
        local_heldout = {j for j, (idx, _, _) in enumerate(members) if idx in heldout_idx}
        for j, decision in decide(sigs, local_heldout, cfg, use_lsh=False).items():
            if decision is not None:
                kind, kept, jaccard = decision
                removed[members[j][0]] = (kind, members[kept][1], jaccard)
    return removed, n_clusters, n_members


def run_dedup_datatrove(input_path: str | Path, stage: StageDir, cfg: DedupConfig, *,
                        seed: int, executor_choice: str) -> Manifest:
    """run_dedup on datatrove's MinHash pipeline, run by the executor cfg.executor names.
    Called by tasks.dedup.run_dedup once it has found the stage directory out of date."""
    key = hashlib.sha256(json.dumps([stage.digests, stage.config_digest, cfg.tasks],
                                    sort_keys=True).encode()).hexdigest()[:12]
    work = work_dir(cfg, stage.dir, key)
    heldout_idx, reused = _export(input_path, work, cfg, seed)
    t0 = time.monotonic()
    facts = run_datatrove(cfg, work)
    datatrove_s = time.monotonic() - t0
    parts, dropped = partition_clusters(work)
    removed, n_clusters, n_members = decide_clusters(iter_clusters(parts), heldout_idx, cfg)
    mh = minhash_config(cfg)
    manifest = write_stage(
        input_path, stage, heldout_idx, removed,
        info={**stage_info(cfg, seed=seed, reused=reused, executor_choice=executor_choice),
              "tasks": cfg.tasks,
              "minhash": f"{mh.num_buckets} buckets x {mh.hashes_per_bucket} hashes", **facts},
        metrics={"dedup.clusters": float(n_clusters),
                 "dedup.cluster_members": float(n_members),
                 "dedup.datatrove_dropped": float(dropped),
                 "dedup.datatrove_s": round(datatrove_s, 3)})
    shutil.rmtree(work.root)
    if not cfg.work_dir and not any(work.root.parent.iterdir()):
        work.root.parent.rmdir()
    return manifest
