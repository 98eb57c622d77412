"""`cnnflow`: the command line. It only turns arguments into flow calls; settings are Hydra's.

    cnnflow train                                  # offline quickstart
    cnnflow train experiment=mnist train.epochs=2 data.batch_size=128 seed=7
    cnnflow train --multirun experiment=quickstart seed=1,2,3
    cnnflow components                             # what is registered, by kind
"""

from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import sys
import uuid

from cnnflow.flows.arguments import build_parser, components_text


def split_experiment(overrides: list[str], default: str | None = "quickstart") -> tuple[str | None, list[str]]:
    """`experiment=X` is the flow's first parameter; everything else stays an override."""
    experiment, rest = default, []
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "experiment":
            experiment = value
        else:
            rest.append(override)
    return experiment, rest


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Hydra's sweep syntax (`seed=1,2,3`, `range(1,4)`, `choice(a,b)`): the cartesian product of jobs."""
    from cnnflow.flows.setup.config import parsed_overrides

    axes = []
    for override in parsed_overrides(overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([override.input_line])
    return [list(job) for job in itertools.product(*axes)]


def sweep_tags(sweep_id: str, number: int) -> list[str]:
    """The tags that find a sweep's jobs in MLflow; the id is quoted, or a hex id such as 7002e071
    would be read as the number 7.002e+74."""
    from cnnflow.flows.tracking.names import SWEEP, SWEEP_JOB

    return [f"+tags.{SWEEP}='{sweep_id}'", f"+tags.{SWEEP_JOB}={number}"]


def _quiet_tracebacks_of_user_errors() -> None:
    """Prefect logs every failed task with a traceback; for a user's mistake, an interruption or a
    full disk the message is enough."""
    from cnnflow.components.errors import UserError

    class DropUserErrorTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            error = record.exc_info[1] if record.exc_info else None
            if isinstance(error, UserError) or (error is not None and (_is_interruption(error) or _disk_full(error))):
                record.exc_info, record.exc_text = None, None
            return True

    for name in ("prefect.flow_runs", "prefect.task_runs", "mlflow.store.db.utils"):
        logging.getLogger(name).addFilter(DropUserErrorTraceback())


def run_train(overrides: list[str], multirun: bool) -> int:
    """One training, or a sweep's jobs one after another. Every job's settings and the store are
    checked first, before any server starts; in a sweep a failed job does not stop the others."""
    from cnnflow.components.data import read_ahead
    from cnnflow.components.errors import UserError, printable
    from cnnflow.flows.setup.config import compose_config
    from cnnflow.flows.tracking import store

    jobs = sweep_jobs(overrides) if multirun else [overrides]
    sweep_id = uuid.uuid4().hex[:8]
    planned = []
    for number, job in enumerate(jobs, start=1):
        experiment, job_overrides = split_experiment(job)
        if multirun:
            job_overrides += sweep_tags(sweep_id, number)
        try:
            cfg = compose_config(experiment, job_overrides)
            if not multirun:
                read_ahead(cfg["data"])  # while MLflow is imported (components/data/core.py)
            store.use_store(cfg)
            planned.append((job, experiment, job_overrides, None))
        except UserError as error:
            if not multirun:
                raise
            planned.append((job, experiment, job_overrides, error))
    from cnnflow.flows.orchestration import engine
    from cnnflow.flows.train import train_flow

    outcomes = []
    with engine.under_configured_server_or_in_process():
        for number, (job, experiment, job_overrides, problem) in enumerate(planned, start=1):
            if multirun:
                named = [] if any(o.startswith("experiment=") for o in job) else [f"experiment={experiment}"]
                print(f"[sweep {sweep_id}] job {number}/{len(jobs)}: {' '.join(named + job)}", flush=True)
            try:
                if problem:
                    raise problem
                outcomes.append((job, "ok", train_flow(experiment, job_overrides)))
            except Exception as error:
                if not multirun:
                    raise
                user_error = isinstance(error, UserError)
                outcomes.append((job, "error" if user_error else "failed",
                                 str(error) if user_error else f"{type(error).__name__}: {error}"))
                print(f"cnnflow: error: {printable(outcomes[-1][2])}", file=sys.stderr)
    return _summary(sweep_id, outcomes) if multirun else 0 if outcomes[0][1] == "ok" else 1


def print_settings(command: str, overrides: list[str]) -> int:
    """`--cfg job`: what a run would be given, composed and checked, without running it."""
    from cnnflow.flows.setup.config import compose_config, to_yaml

    experiment, rest = split_experiment(overrides)
    if command == "search":
        from cnnflow.flows.search.space import planned

        plan = planned(experiment, rest)
        settings = {**plan.cfg, "search": {**plan.search, "space": plan.expressions, "study": plan.study_name}}
    else:
        settings = compose_config(experiment, rest)
    if settings["data"]["source"] != "tfds":  # what the data holds, read from files here (TFDS's may need a download)
        from cnnflow.components.data import source_from
        from cnnflow.flows.setup.settings import check_model_fits

        check_model_fits(settings, source_from(settings["data"]).info.num_classes)
    print(to_yaml(settings), end="")
    return 0


def run_search(overrides: list[str], pool: str | None) -> int:
    """A search: its settings, space and store checked before any server starts; the best trial printed."""
    from cnnflow.components.errors import counted
    from cnnflow.flows.orchestration import engine
    from cnnflow.flows.search.flow import search_flow
    from cnnflow.flows.search.space import planned
    from cnnflow.flows.tracking import store

    experiment, rest = split_experiment(overrides)
    store.use_store(planned(experiment, rest).cfg)
    with engine.under_configured_server_or_in_process():
        result = search_flow(experiment, rest, pool)
    print(f"\nsearch {result['study']}: {counted(result['trials'], 'trial')} ({result['pruned']} pruned), "
          f"{counted(result['epochs_spent'], 'epoch')}; MLflow run {result['run_id']}")
    print(f"  best: trial {result['best_trial']}  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in result["params"].items()))
    print("  " + "  ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith(("val_", "test_")) or k == "loss")
          + f"  (run {result['best_run']})")
    return 0


def _summary(sweep_id: str, outcomes: list[tuple[list[str], str, str]]) -> int:
    """Prints each job's outcome (its run id, or why it failed); 0 when every job succeeded."""
    from cnnflow.flows.orchestration import report

    print(f"\nsweep {sweep_id}: {sum(o[1] == 'ok' for o in outcomes)}/{len(outcomes)} jobs succeeded")
    for job, status, detail in outcomes:
        print(f"  {status:<6} {' '.join(job) or '(no overrides)'}  ->  {'run ' + detail if status == 'ok' else detail}")
    report.publish_table(f"sweep-{sweep_id}", [{"job": " ".join(job) or "(no overrides)", "status": status,
                                                "run or reason": detail} for job, status, detail in outcomes],
                         f"sweep {sweep_id}: each job's MLflow run, or why it failed")
    return 0 if all(status == "ok" for _, status, _ in outcomes) else 1


def run_on_pool(overrides: list[str], multirun: bool, pool: str, wait: bool = True) -> int:
    """Each job as a run of the pool's train deployment, so every free worker trains one; waits and
    prints the summary a local sweep prints, the results read from MLflow by the sweep's tag."""
    import mlflow

    from cnnflow.flows.orchestration import pool as pool_jobs
    from cnnflow.flows.tracking import names, store

    jobs = sweep_jobs(overrides) if multirun else [overrides]
    sweep_id = uuid.uuid4().hex[:8]
    submitted = []
    for number, job in enumerate(jobs, start=1):
        experiment, job_overrides = split_experiment(job, default=None)
        submitted.append((experiment, job_overrides + sweep_tags(sweep_id, number)))
    flow_runs = pool_jobs.submitted(pool, submitted)
    for number, (job, flow_run) in enumerate(zip(jobs, flow_runs), start=1):
        print(f"[sweep {sweep_id}] job {number}/{len(jobs)}: {' '.join(job) or '(no overrides)'} -> flow run "
              f"{flow_run.name} ({flow_run.id})", flush=True)
    if not wait:
        print(f"submitted to work pool {pool}; follow them in the Prefect UI, or: cnnflow runs (tag sweep={sweep_id})")
        return 0
    print(f"waiting for the workers of pool {pool} (Ctrl-C stops waiting; the jobs go on) ...", flush=True)
    try:
        ended = pool_jobs.finished(flow_runs)
    except KeyboardInterrupt:
        print(f"stopped waiting; the jobs go on in pool {pool} (cnnflow runs, tag sweep={sweep_id})", file=sys.stderr)
        return 130
    store.use_store({}, must_exist=True)
    runs = {run.data.tags.get(names.SWEEP_JOB): run for run in mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string=f"tags.{names.SWEEP} = '{sweep_id}'")}
    outcomes = []
    for number, (job, flow_run) in enumerate(zip(jobs, ended), start=1):
        run = runs.get(str(number))
        ok = flow_run.state.is_completed() and run is not None and run.info.status == "FINISHED"
        restarts = max(0, (flow_run.run_count or 1) - 1)
        outcomes.append((job, "ok" if ok else "failed", (run.info.run_id if ok else
                         f"{flow_run.state.name}: {flow_run.state.message or ''}".strip())
                         + (f" ({restarts} restart{'s' * (restarts > 1)} after crashes)" if restarts else "")))
    return _summary(sweep_id, outcomes)


def _run_flow(args: argparse.Namespace):
    """The flow behind `continue`, `evaluate`, `predict` (and `serve`, `runs`), with the command's arguments."""
    if args.command == "serve":
        from cnnflow.flows.serve import serve_all

        return serve_all(*split_experiment(args.overrides))
    if args.command == "deploy":
        from cnnflow.flows.serve import deploy_all

        names = deploy_all(args.pool, *split_experiment(args.overrides))
        return print(f"deployed on work pool {args.pool}: {', '.join(names)}\nstart a worker on each machine "
                     f"(with cnnflow installed): prefect worker start --pool {args.pool}")
    from cnnflow.flows.tracking import store

    store.use_store({}, must_exist=True)  # these read runs: no store here is one line, not an empty new one
    if args.command == "runs":
        from cnnflow.flows.runs import runs_table

        return print(runs_table(args.experiment, args.limit))
    if args.command == "data":
        from cnnflow.flows.runs import data_diff

        return print(data_diff(*args.runs))
    from cnnflow.flows.orchestration import engine
    from cnnflow.flows.setup import runtime

    runtime.import_tensorflow_quietly()
    with engine.under_configured_server_or_in_process():
        if args.command == "continue":
            from cnnflow.flows.train import continue_flow

            return continue_flow(args.run_id, args.epochs, args.overrides)
        from cnnflow.flows.inference import evaluate_flow, predict_flow

        if args.command == "evaluate":
            return evaluate_flow(args.model, args.split)
        return predict_flow(args.model, args.paths, args.csv, args.figure)


def _is_interruption(error: BaseException) -> bool:
    from cnnflow.components.compat import is_termination_signal

    return isinstance(error, KeyboardInterrupt) or is_termination_signal(error)  # Prefect's, for SIGTERM


def _disk_full(error: BaseException) -> str | None:
    """What could not be written because the disk is full, or None for any other error."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"{error.filename} could not be written" if error.filename else "a file could not be written"
    from cnnflow.components.compat import is_database_full

    return "the MLflow store could not be written" if is_database_full(error) else None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter is not for users
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from a closed network
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for kilobyte downloads are noise
    parser = build_parser()
    # KEY=VALUE overrides may come after options (`continue RUN --epochs 2 optimizer.learning_rate=1e-4`)
    args, extra = parser.parse_known_args(argv)
    unknown_options = [arg for arg in extra if arg.startswith("-") or "=" not in arg]
    if unknown_options or (extra and args.command not in ("train", "search", "continue", "serve", "deploy")):
        parser.error(f"unrecognized arguments: {' '.join(unknown_options or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "components":
        from cnnflow.components import registry

        if args.kind and args.kind not in registry.KINDS:
            parser.error(f"unknown kind {args.kind!r}; the kinds are: {', '.join(registry.KINDS)}")
        print(components_text() if not args.kind else "\n".join(registry.names(args.kind)))
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    from cnnflow.components.errors import UserError, exit_code, printable
    from cnnflow.flows.orchestration import interrupts

    _quiet_tracebacks_of_user_errors()
    interrupts.terminate_cleanly()  # SIGTERM (workers, Docker, Kubernetes) stops like Ctrl-C
    try:
        if args.command == "cache":
            from cnnflow.flows import housekeeping

            print(housekeeping.run(args.action, args.dir, args.outputs, args.older_than, args.max_size))
            return 0
        if args.command == "train" and args.pool:
            return run_on_pool(args.overrides, args.multirun, args.pool, wait=not args.no_wait)
        if args.no_wait if args.command == "train" else False:
            parser.error("--no-wait goes with --pool")
        if args.command in ("train", "search") and args.cfg:
            return print_settings(args.command, args.overrides)
        if args.command == "train":
            return run_train(args.overrides, args.multirun)
        if args.command == "search":
            return run_search(args.overrides, args.pool)
        _run_flow(args)
        return 0
    except UserError as error:
        print(f"cnnflow: error: {printable(str(error))}", file=sys.stderr)
        return exit_code(error)
    except BaseException as error:
        if _is_interruption(error):
            print(f"cnnflow: {'interrupted' if exit_code(error) == 130 else 'terminated'} (a training keeps its last "
                  f"checkpoint: the same command resumes it)", file=sys.stderr)
            return exit_code(error)
        if what := _disk_full(error):
            print(f"cnnflow: error: the disk is full: {what}; free space under {os.getcwd()} (or where "
                  f"MLFLOW_TRACKING_URI points), then the same command resumes", file=sys.stderr)
            return 5
        raise


EXIT_GRACE_SECONDS = 10


def run() -> None:
    """The `cnnflow` command: `main`, then exit with its code.

    After a Ctrl-C, SIGTERM or a server outage the exit is bounded: at interpreter exit Prefect's
    services drain what they hold, and under a Prefect server one was seen to wait forever for work
    the signal had interrupted (the process lived on after "cnnflow: terminated"), and with the
    server gone each queued event takes seconds to fail. They get EXIT_GRACE_SECONDS.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `cnnflow runs | head -3`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        code = 141  # 128 + SIGPIPE, as other commands cut off by their reader end
    if code in (130, 143, 5):  # 5: a server outage, whose dropped events Prefect would try one by one
        _leave_after(EXIT_GRACE_SECONDS, code)
    sys.exit(code)


def _leave_after(seconds: float, code: int) -> None:
    """End the process with `code` in `seconds` if it has not ended by then."""
    import threading

    def leave():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True  # a process that ends in time is not held up by it
    timer.start()


if __name__ == "__main__":
    run()
