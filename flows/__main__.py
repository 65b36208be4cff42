"""Command line: `python -m flows <stage>` runs one stage as a Prefect flow (this is what dvc.yaml calls).

Other commands: `pipeline`, `serve`, `deploy`, `worker`, `remote`, `queue`, `lineage`, `list`, `check-params`,
`clean-checkpoints`, `server start|stop|status`.
Run `python -m flows --help`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("DVC_NO_ANALYTICS", "true")
# No telemetry from MLflow or the Prefect SDK: stages run offline, and MLflow's client would start a thread
# that fetches its config over the network in every stage process.
os.environ.setdefault("DO_NOT_TRACK", "true")

from components.errors import UserError  # noqa: E402  (light imports only before the stage runs)
from flows import STAGES, TOOLS  # noqa: E402


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run_stage_command(stage: str) -> int:
    from components.config import load_params
    from components.io import exit_with_launcher
    from components.tracking.lineage import resolve_tracking_uri
    from components.tracking.runs import InvocationRun
    from components.tracking.stage import check_declared_inputs
    from flows.runtime import configure_prefect, dvc_invocation, output_to_prefect, repo_root, use_home_tracking_store

    root = repo_root()
    params = load_params(root / "params.yaml")  # fail fast, before any server or output is touched
    check_declared_inputs(root, stage)
    use_home_tracking_store(root, params.tracking.uri)
    configure_prefect(root)
    exit_with_launcher()
    module = importlib.import_module({**STAGES, **TOOLS}[stage])
    import flows.stage
    from flows.stage import COMPLETED

    flows.stage.EXIT_IF_PREFECT_LOST = True
    tracking_uri = resolve_tracking_uri(root, params.tracking.uri)
    with InvocationRun(root, params.tracking.experiment, tracking_uri, dvc_invocation()) as parent:
        stage_flow = module.flow_fn.with_options(flow_run_name=f"{stage}-{parent.run_name}") if parent.run_name \
            else module.flow_fn
        try:
            with output_to_prefect():
                state = stage_flow(return_state=True)
        except Exception as e:  # Prefect could not record the flow run's end (server gone)
            parent.close(stage, failed=stage not in COMPLETED)
            if stage not in COMPLETED:
                raise
            print(f"warning: stage '{stage}' completed, but Prefect could not record it ({type(e).__name__}: "
                  f"{str(e)[:200]}); its flow run is marked Completed when the stage next runs", file=sys.stderr)
            return 0
        parent.close(stage, failed=not (state.is_completed() or stage in COMPLETED))
    if state.is_completed():
        return 0
    if stage in COMPLETED:  # the work and MLflow run are complete; only orchestration failed afterwards
        print(f"warning: stage '{stage}' completed, but its Prefect flow run ended {state.name}: "
              f"{(state.message or '')[:200]}", file=sys.stderr)
        return 0
    cause = getattr(state, "data", None)
    message = state.message or f"stage '{stage}' failed"
    if isinstance(cause, UserError) or "UserError" in message or not message.startswith("Flow run encountered"):
        return _fail(message)
    return 1  # a bug: Prefect has already printed the traceback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows",
        description="Run pipeline stages as Prefect flows (each tracked in MLflow). "
                    "Normally invoked by `dvc repro`, which decides which stages are stale.",
        epilog="examples:\n  python -m flows shard          run the shard stage now (ignores DVC staleness)\n"
               "  python -m flows check-params --set shard.val_fraction=0.1\n"
               "  python -m flows pipeline --set shard.seed=1   the whole DAG as one flow, override saved as a DVC exp\n"
               "  python -m flows lineage shard  runs behind the current output, back to the data\n"
               "  dvc repro                      rebuild whatever changed (the usual way)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in STAGES.items():
        sub.add_parser(name, help=f"run the '{name}' stage")
    sub.add_parser("selfcheck", help="run the stage contract with an empty body (checks Prefect + MLflow)")
    sub.add_parser("list", help="list the stages")
    chk = sub.add_parser("check-params", help="validate params.yaml (with optional overrides) and exit")
    chk.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a param, e.g. shard.val_fraction=0.1 (repeatable)")
    srv = sub.add_parser("server", help="the project-local Prefect server used when PREFECT_API_URL is unset")
    srv.add_argument("action", choices=["start", "stop", "status"])
    pipe = sub.add_parser("pipeline", help="reproduce the DVC pipeline stage by stage as one Prefect flow")
    pipe.add_argument("targets", nargs="*", default=["all"], help="stage names (default: all)")
    pipe.add_argument("--force", action="store_true", help="rerun the planned stages even if up to date")
    pipe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="param override written to params.yaml and saved as a DVC experiment (repeatable)")
    pipe.add_argument("--name", dest="run_name", default=None, help="MLflow parent run / DVC experiment name")
    cln = sub.add_parser("clean-checkpoints", help="remove checkpoints/<stage>/<fingerprint>/ dirs no current "
                         "output needs (keeps each output's own and the newest per stage)")
    cln.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    sub.add_parser("serve", help="serve the pipeline and each stage as Prefect deployments (runs until Ctrl-C)")
    dep = sub.add_parser("deploy", help="deploy the pipeline and each stage on a Prefect work pool (runs on its workers)")
    dep.add_argument("--pool", default="pipeline", help="work pool name (created as a process pool; default: pipeline)")
    dep.add_argument("--concurrency-limit", type=int, default=None,
                     help="runs the pool executes at once (default 1 for a new pool: one GPU, one training stage)")
    rem = sub.add_parser("remote", help="check the DVC remote (dvc push / dvc pull) exists and answers; one line")
    rem.add_argument("name", nargs="?", default=None, help="remote name (default: the default remote)")
    que = sub.add_parser("queue", help="dvc exp run --queue ARGS, after checking no untracked file would be left out")
    que.add_argument("dvc_args", nargs=argparse.REMAINDER, help="arguments for dvc exp run, e.g. -S teacher.lr=0.001")
    wrk = sub.add_parser("worker", help="start a Prefect worker for a work pool here (prefect worker start --pool)")
    wrk.add_argument("--pool", default="pipeline", help="work pool name (default: pipeline)")
    lin = sub.add_parser("lineage", help="print the chain of MLflow runs from a run (or a stage's output) to the data")
    lin.add_argument("ref", help="an MLflow run id or a stage name (the run that produced its current output)")
    lin.add_argument("--json", action="store_true", help="print the chain as JSON")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["queue"]:  # everything after it goes to dvc exp run as is (argparse would parse -S itself)
        from flows.sweep import queue_command

        try:
            return queue_command(argv[1:])
        except UserError as e:
            return _fail(str(e))
    args = parser.parse_args(argv)

    try:
        if args.command in STAGES or args.command in TOOLS:
            return run_stage_command(args.command)
        if args.command == "list":
            print("\n".join(STAGES))
            return 0
        if args.command == "check-params":
            from components.config import load_params
            from flows.runtime import repo_root

            load_params(repo_root() / "params.yaml", args.overrides)
            print("params OK")
            return 0
        if args.command == "pipeline":
            from flows.pipeline import run_pipeline_command

            return run_pipeline_command(args.targets, args.force, args.overrides, args.run_name)
        if args.command == "clean-checkpoints":
            from flows.clean import clean_command
            from flows.runtime import repo_root

            return clean_command(repo_root(), args.dry_run)
        if args.command == "serve":
            from flows.serve import serve_command

            return serve_command()
        if args.command == "deploy":
            from flows.serve import deploy_command

            return deploy_command(args.pool, args.concurrency_limit)
        if args.command == "remote":
            from flows.remote import remote_command

            return remote_command(args.name)
        if args.command == "worker":
            from flows.serve import worker_command

            return worker_command(args.pool)
        if args.command == "lineage":
            import json

            from components.config import load_params
            from components.tracking.lineage import resolve_tracking_uri
            from components.tracking.registry import check_tracking_server
            from components.tracking.runs import format_chain, lineage_chain, resolve_ref
            from flows.runtime import repo_root

            root = repo_root()
            params = load_params(root / "params.yaml")
            tracking_uri = resolve_tracking_uri(root, params.tracking.uri)
            check_tracking_server(tracking_uri)
            chain = lineage_chain(resolve_ref(root, args.ref, params.tracking.experiment, tracking_uri), tracking_uri)
            print(json.dumps(chain, indent=2) if args.json else format_chain(chain))
            return 0
        if args.command == "server":
            from flows.runtime import ensure_local_server, home_root, local_server_url, repo_root, stop_local_server

            root = home_root(repo_root())
            if args.action == "start":
                print(ensure_local_server(root).removesuffix("/api"))
            elif args.action == "stop":
                print("stopped" if stop_local_server(root) else "not running")
            else:
                url = local_server_url(root)
                print(url.removesuffix("/api") if url else "not running")
            return 0
        parser.print_help()
        return 2
    except UserError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
