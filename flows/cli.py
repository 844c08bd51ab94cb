"""The ``ftflow`` command: run the pipeline, run one stage, start the local stack, deploy."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from data_contracts.config import ConfigError, FinalError, default_home, load_config
from data_contracts.records import RecordError
from flows.env import quiet_offline_env
from flows.preflight import PreflightError
from flows.stack import apply_stack_env
from tasks.quiet import quiet_library_noise
from tasks.stages import COMMANDS


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """The optional config path and the key=value overrides, in any order."""
    config = [i for i in items if "=" not in i]
    if len(config) > 1:
        raise ConfigError(f"expected one config file, got {config}")
    return (config[0] if config else None), [i for i in items if "=" in i]


def _set_home_env(home: str) -> None:
    # Keep Prefect's local state beside ours unless the user points Prefect elsewhere. Prefect
    # creates its home without parents: on a new run.home its SQLite then cannot open and the
    # temporary server never starts.
    prefect_home = Path(os.environ.setdefault("PREFECT_HOME", str(Path(home) / "prefect")))
    prefect_home.expanduser().mkdir(parents=True, exist_ok=True)


def _start_local_prefect() -> None:
    """Prefect's temporary server of local mode (no PREFECT_API_URL), started under a lock on
    its home: two runs starting at once on one home raced on its SQLite schema. Nothing to do
    when the run talks to a server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    from tasks.locks import file_lock

    with file_lock(Path(PREFECT_HOME.value()) / "ftflow-server.lock",
                   "another run on this home is starting Prefect's temporary server"):
        SubprocessASGIServer().start()  # the instance the flow's Prefect client uses


def cmd_run(args: argparse.Namespace) -> int:
    from flows.preflight import preflight
    from tasks.interrupt import RunInterrupted, stop_on_signals

    config, overrides = _split_args(args.items)
    with stop_on_signals():  # SIGTERM/SIGINT: stop at a safe point, mark the runs, exit
        cfg = load_config(config, overrides)  # validate before Prefect starts
        preflight(cfg)  # tracking store, inputs, base model, disk: in seconds, before any work
        _set_home_env(cfg.run.home)
        try:
            # Prefect stops its temporary server at exit (atexit, after its log and event
            # workers have drained); a signal ends the process through that path too.
            _start_local_prefect()
            from flows.pipeline import finetune_pipeline
            from flows.report import print_summary

            out = finetune_pipeline(config_path=config, overrides=overrides, run_id=args.run_id)
        except RunInterrupted as err:
            again = f" --run-id {args.run_id}" if args.run_id else " --run-id <its run id>"
            print(f"ftflow: run {err} at a safe point; rerun with{again} to resume",
                  file=sys.stderr)
            return 128 + err.signum
        print_summary(out, cfg)
    return 0


# `ftflow stage` options that name the earlier stage directories a stage reads beyond --input.
STAGE_DIR_OPTIONS = {"train": "train_dir", "evaluate": "eval_dir"}


def cmd_stage(args: argparse.Namespace) -> int:
    from tasks.stages import StageContext, run_stage, spec

    cfg = load_config(args.config, args.overrides)
    s = spec(args.name)
    out = Path(args.output)
    inputs: list[Any] = [args.input]
    for read in s.reads[1:]:
        option = STAGE_DIR_OPTIONS[spec(read).command]
        sibling = Path(args.input).parent / spec(read).name  # the run folder's own stage dir
        if not getattr(args, option) and _is_stage(args.input, spec(read).command):
            setattr(args, option, args.input)  # a train dir holds the held-out split too
        elif not getattr(args, option) and (sibling / "manifest.json").exists():
            setattr(args, option, str(sibling))
        if not getattr(args, option):
            raise ConfigError(f"{s.command} needs --{option.replace('_', '-')} (a "
                              f"{spec(read).command} stage directory)")
        inputs.append(getattr(args, option))
    from tasks.interrupt import RunInterrupted, stop_on_signals

    with stop_on_signals():  # SIGTERM/SIGINT: training saves a checkpoint, then the stage stops
        try:
            m = run_stage(s, StageContext(cfg, out, tuple(inputs)))
        except RunInterrupted as err:
            print(f"ftflow: stage {s.command} {err}; run the same command again to resume",
                  file=sys.stderr)
            return 128 + err.signum
    if m.info.get("main_process") is False:
        return 0  # another process of an `accelerate launch` wrote the stage and reports it
    print(f"{s.command}: in={m.records_in} generated={m.generated} kept={m.kept} "
          f"filtered={m.filtered_total} {m.filtered or ''} deduplicated={m.deduplicated} "
          f"quarantined={m.quarantined} -> {out}")
    if "gate" in m.info:
        print(m.info["gate"])
    return 0


def _is_stage(path: str, command: str) -> bool:
    """Is path a finished stage directory written by this command?"""
    from data_contracts.manifest import MANIFEST_NAME, Manifest

    return (Path(path) / MANIFEST_NAME).is_file() and Manifest.read(path).stage == command


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home or default_home()).absolute()


def cmd_up(args: argparse.Namespace, foreground: bool = False) -> int:
    from flows.stack import up
    prefect_db = args.prefect_db or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
    return up(_home(args), args.prefect_port, args.mlflow_port, backend=args.backend,
              prefect_db_url=prefect_db, pool=args.pool, foreground=foreground, worker_limit=args.worker_limit)


def cmd_stack(args: argparse.Namespace) -> int:
    return cmd_up(args, foreground=True)


def cmd_down(args: argparse.Namespace) -> int:
    from flows.stack import down
    return down(_home(args), grace=args.grace)


def cmd_status(args: argparse.Namespace) -> int:
    from flows.stack import status
    return status(_home(args))


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.stack import DEFAULT_POOL, HOST, prefect_reachable, read_state

    config, overrides = _split_args(args.items)
    if config is not None:
        config = str(Path(config).absolute())  # the worker runs elsewhere
    load_config(config, overrides)  # validated exactly like `ftflow run`, before registering
    home = default_home()
    state = read_state(home) or {}
    api_url = os.environ.get("PREFECT_API_URL")
    if not api_url or not prefect_reachable(api_url):
        where = (f"PREFECT_API_URL={api_url}" if api_url else
                 f"PREFECT_API_URL is unset and no stack runs in {home}")
        print(f"ftflow: error: no Prefect server answers ({where}): start one with "
              f"`ftflow up` (it serves http://{HOST}:4200/api by default)", file=sys.stderr)
        return 2
    os.environ["PREFECT_API_URL"] = api_url
    _set_home_env(str(home))
    from flows.deploy import register

    pool = args.pool or state.get("pool") or DEFAULT_POOL
    for line in register(home, api_url, config, overrides, cron=args.cron, watch=args.watch,
                         pool=pool, replace=args.replace):
        print(line)
    print(f"see them: {api_url.removesuffix('/api')}/deployments")
    return 0


def cmd_quality_train(args: argparse.Namespace) -> int:
    from tasks.quality import QualityModelError, report_path, train_quality_model

    try:
        report = train_quality_model(
            args.good, args.bad, args.output, epochs=args.epochs, lr=args.lr,
            heldout_fraction=args.heldout_fraction, min_examples=args.min_examples,
            seed=args.seed)
    except QualityModelError as err:
        print(f"ftflow: error: {err}", file=sys.stderr)
        return 2
    print(f"quality model: {report.model} trained on {report.train}, held-out accuracy "
          f"{report.heldout_accuracy} on {report.heldout} (report: {report_path(report.model)})")
    print(f"use it: ftflow run CONFIG ingest.quality_model={report.model} "
          "ingest.quality_threshold=0.5")
    return 0


def _add_quality_model(sub: Any) -> None:
    """`ftflow quality-model train`: a good/bad fastText classifier for ingest.quality_model."""
    qm = sub.add_parser("quality-model", help="train the ingest quality classifier")
    qsub = qm.add_subparsers(dest="quality_command", required=True)
    tr = qsub.add_parser("train", help="train a good/bad fastText classifier from your examples",
                         description="Every record of a --good file is labelled good, every "
                         "record of a --bad file bad (any ftflow input form: chat, ShareGPT, "
                         "Alpaca, text, preference pairs). Writes the model and a JSON report "
                         "(PATH with .json) with held-out accuracy.")
    tr.add_argument("--good", nargs="+", required=True, metavar="FILE", help="good examples")
    tr.add_argument("--bad", nargs="+", required=True, metavar="FILE", help="bad examples")
    tr.add_argument("--output", required=True, metavar="PATH",
                    help="model file: .bin, or .ftz for a quantized (smaller) one")
    tr.add_argument("--epochs", type=int, default=25)
    tr.add_argument("--lr", type=float, default=0.5, help="halved automatically on NaN")
    tr.add_argument("--heldout-fraction", type=float, default=0.2,
                    help="share of each label held out to measure accuracy (0: none)")
    tr.add_argument("--min-examples", type=int, default=10, help="per label, at least")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=cmd_quality_train)


def _registry_client(args: argparse.Namespace) -> Any:
    from mlflow.tracking import MlflowClient

    cfg = load_config(None, [f"run.home={_home(args)}"] +
                      ([f"run.tracking_uri={args.tracking_uri}"] if args.tracking_uri else []))
    uri = cfg.run.resolved_tracking_uri()
    return MlflowClient(uri, registry_uri=uri)


def cmd_champion(args: argparse.Namespace) -> int:
    """`ftflow promote` / `ftflow rollback`: move the champion alias, recorded."""
    from mlflow.exceptions import MlflowException

    from tasks.export_registry import RegistryError, promote, rollback

    client = _registry_client(args)
    try:
        if args.command == "promote":
            move = promote(client, _home(args), args.name, args.version, args.reason)
        else:
            move = rollback(client, _home(args), args.name, args.reason)
    except (RegistryError, MlflowException) as err:
        print(f"ftflow: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.name}@champion: {move.previous or '-'} -> {move.version} ({move.action} by "
          f"{move.who} at {move.when}: {move.reason})")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """`ftflow history NAME`: every recorded move of the champion alias, oldest first."""
    from tasks.export_registry import CANDIDATE, CHAMPION, alias_version, history

    client = _registry_client(args)
    for m in history(client, args.name):
        print(f"{m.when}  {m.action:<8} {m.previous or '-':>4} -> {m.version:<4} {m.who}: "
              f"{m.reason}")
    print(f"now: champion {alias_version(client, args.name, CHAMPION) or '-'}, candidate "
          f"{alias_version(client, args.name, CANDIDATE) or '-'}")
    return 0


def _add_registry_commands(sub: Any) -> None:
    """`ftflow promote|rollback|history`: operate the registry's champion alias."""
    def options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("name", help="registered model name (export.model_name)")
        sp.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: "
                        "$FTFLOW_TRACKING_URI, a running stack's, else sqlite in the home)")
        sp.add_argument("--home", help="ftflow home: its registry lock and history file "
                        "(default: $FTFLOW_HOME, else ./.ftflow)")

    pr = sub.add_parser("promote", help="make a registered version the champion (recorded)")
    options(pr)
    pr.add_argument("version")
    pr.add_argument("--reason", required=True, help="why (kept on the version and in history)")
    pr.set_defaults(func=cmd_champion)
    rb = sub.add_parser("rollback", help="move champion back to the version it replaced")
    options(rb)
    rb.add_argument("--reason", required=True, help="why (kept on the version and in history)")
    rb.set_defaults(func=cmd_champion)
    hi = sub.add_parser("history", help="who moved champion when and why")
    options(hi)
    hi.set_defaults(func=cmd_history)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftflow", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline")
    run.add_argument("items", nargs="*", help="[CONFIG.yaml] [section.key=value ...]")
    run.add_argument("--run-id", help="resume (or name) a run: stages already done are skipped")
    run.set_defaults(func=cmd_run)

    st = sub.add_parser("stage", help="run one stage alone on a file or a stage directory")
    st.add_argument("name", choices=COMMANDS)
    st.add_argument("--input", required=True, help="raw input file/glob or a stage directory")
    st.add_argument("--output", required=True, help="stage directory to write")
    st.add_argument("--config", help="pipeline config YAML (default: embedded defaults)")
    st.add_argument("--train-dir", help="evaluate: the train stage directory")
    st.add_argument("--eval-dir", help="export: the evaluate stage directory")
    st.add_argument("overrides", nargs="*", help="section.key=value overrides")
    st.set_defaults(func=cmd_stage)

    def stack_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--home", help="ftflow home (default: $FTFLOW_HOME, else ./.ftflow)")
        sp.add_argument("--prefect-port", type=int, default=4200)
        sp.add_argument("--mlflow-port", type=int, default=5000)
        sp.add_argument("--backend", metavar="URI",
                        help="MLflow backend store, e.g. postgresql://user@host/db "
                        "(default: sqlite in the home)")
        sp.add_argument("--prefect-db", metavar="URL",
                        help="Prefect database, e.g. postgresql+asyncpg://user@host/db "
                        "(default: $PREFECT_API_DATABASE_CONNECTION_URL, else sqlite)")
        sp.add_argument("--pool", default="ftflow", help="the worker's work pool")
        sp.add_argument("--worker-limit", type=int, default=1,
                        help="flow runs the worker runs at once (default 1: one pipeline "
                        "already uses every core)")

    upp = sub.add_parser("up", help="start prefect server, a worker and mlflow server on "
                         "127.0.0.1 in the background")
    stack_options(upp)
    upp.set_defaults(func=cmd_up)
    sk = sub.add_parser("stack", help="`up` in the foreground: Ctrl-C/SIGTERM stops it all")
    stack_options(sk)
    sk.set_defaults(func=cmd_stack)
    dn = sub.add_parser("down", help="stop the stack `up` started")
    dn.add_argument("--home")
    dn.add_argument("--grace", type=float, default=20.0,
                    help="seconds between SIGTERM and SIGKILL")
    dn.set_defaults(func=cmd_down)
    stt = sub.add_parser("status", help="what of the stack runs, and its URLs (exit 0: all)")
    stt.add_argument("--home")
    stt.set_defaults(func=cmd_status)

    dp = sub.add_parser("deploy", help="register the pipeline on the stack's work pool: "
                        "cron schedule and/or data arrival")
    dp.add_argument("items", nargs="*", help="[CONFIG.yaml] [section.key=value ...]")
    dp.add_argument("--cron", default="0 3 * * *")
    dp.add_argument("--watch", help="inbox folder: a new file there triggers a run")
    dp.add_argument("--pool", help="work pool (default: the stack's, else ftflow)")
    dp.add_argument("--replace", action="store_true",
                    help="overwrite schedules/parameters edited in the UI since the last deploy")
    dp.set_defaults(func=cmd_deploy)

    _add_quality_model(sub)
    _add_registry_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    quiet_offline_env()
    apply_stack_env(default_home())  # a running `ftflow up` stack, unless the user set others
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow the options (argparse stops a positional list at them)
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    target = "overrides" if hasattr(args, "overrides") else "items"
    if hasattr(args, target):
        setattr(args, target, list(getattr(args, target) or []) + extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):  # one line per Prefect API call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_library_noise()  # library lines no user can act on (tasks/quiet.py)
    try:
        return args.func(args)
    except PreflightError as err:
        for problem in err.problems:
            print(f"ftflow: error: {problem}", file=sys.stderr)
        return 2
    except (FinalError, RecordError, FileNotFoundError) as err:
        from tasks.tracking import TrackingUnavailable

        print(f"ftflow: error: {err}", file=sys.stderr)
        # 2: change something and run again; 1: the tracking server went away (run again as is)
        return 1 if isinstance(err, TrackingUnavailable) else 2


if __name__ == "__main__":
    sys.exit(main())
