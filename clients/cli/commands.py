"""`lego`: the command line. Each subcommand is a thin front for a library call.

A subcommand's own modules (benchmarks, the local cluster, a process's stack) are
imported when it runs, so that `lego status` or `lego generate` starts in half a second
(tests/test_layout.py lists these imports and why they wait)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from broker import auth
from broker.catalog import load_catalog
from broker.config import parse_options
from broker.logs import configure_logging
from broker.protocol.tasks import TaskKind
from clients import Client, LegoError
from clients.cli import admin as admin_cli
from clients.cli.admin import add_broker_flags
from clients.cli.status_view import status_lines
from clients.comfy import ComfyImportError, import_graph, load_graph


def _print_progress(job, stream=sys.stderr) -> None:
    width = 30
    for event in job.progress():
        frac = event.done_nodes / max(1, event.total_nodes)
        bar = "#" * int(frac * width)
        label = f"step {event.step}/{event.total_steps}" if event.kind == TaskKind.DENOISE else event.node
        stream.write(f"\r[{bar:<{width}}] {event.done_nodes}/{event.total_nodes} {label:<24}")
        stream.flush()
    stream.write("\n")


def _params(args) -> dict:
    params = parse_options(args.param)
    for key in ("seed", "steps", "width", "height"):
        if getattr(args, key, None) is not None:
            params[key] = getattr(args, key)
    return params


def cmd_generate(args) -> int:
    with Client(args.broker, key_file=args.key_file) as client:
        try:
            job = client.submit(args.workflow, prompt=args.prompt, **_params(args))
            if not args.quiet:
                _print_progress(job)
            result = job.result(timeout=args.timeout)
        except LegoError as exc:
            print(f"lego generate: {exc}", file=sys.stderr)
            return 1
    path = result.save_png(args.output)
    print(f"wrote {path} ({result.image.shape[1]}x{result.image.shape[0]}, seed {result.params.get('seed')}, "
          f"{result.latency_s:.2f}s)")
    return 0


def cmd_workflows(args) -> int:
    if args.offline:
        infos = [{"name": w.name, "description": w.description, "models": w.models,
                  "inputs": {i.name: i.__dict__ for i in w.inputs.values()}} for w in load_catalog(args.catalog or []).workflows.values()]
    else:
        try:
            with Client(args.broker, key_file=args.key_file) as client:
                infos = [{"name": w.name, "description": w.description, "models": w.models,
                          "inputs": {i.name: i.to_wire() for i in w.inputs}, "registered": w.registered}
                         for w in client.workflows()]
        except LegoError as exc:
            print(f"lego workflows: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(infos, indent=2, default=list))
        return 0
    for info in infos:
        registered = " (registered at run time)" if info.get("registered") else ""
        print(f"{info['name']:<28} {info['description']}{registered}")
        print(f"{'':<28} models: {', '.join(info['models'])}")
        inputs = ", ".join(f"{n}{'*' if i['required'] else '=' + repr(i['default'])}" for n, i in info["inputs"].items())
        print(f"{'':<28} inputs: {inputs}")
    return 0


def cmd_workflows_import(args) -> int:
    """A ComfyUI graph (API or UI format) -> a catalog file the cluster loads with --catalog."""
    from pathlib import Path

    out = Path(args.out or f"{args.name}.toml")
    if out.exists() and not args.replace:
        print(f"lego workflows import: --out: {out} exists (--replace overwrites it)", file=sys.stderr)
        return 2
    try:
        catalog = load_catalog(args.catalog or [])
        imported = import_graph(load_graph(args.graph), name=args.name, models_dir=args.models_dir, catalog=catalog,
                                replace=args.replace)
    except ComfyImportError as exc:
        if args.json:
            print(json.dumps(exc.response(), indent=2))
        print(f"lego workflows import: {args.graph} cannot be served:\n{exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # the catalog given with --catalog does not load
        print(f"lego workflows import: {exc}", file=sys.stderr)
        return 2
    out.write_text(imported.toml)
    if args.json:
        print(json.dumps({"workflow": imported.name, "catalog": str(out), "defaults": imported.defaults,
                          "images": imported.images, "notes": imported.notes}, indent=2, default=str))
        return 0
    print(f"wrote {out}: workflow {imported.name!r}; serve it with --catalog {out}")
    for note in imported.notes:
        print(f"  note: {note}")
    return 0


def cmd_workflows_register(args) -> int:
    """The [workflows.*] tables of a catalog file, registered at the running broker (admin key)."""
    from pathlib import Path

    try:
        doc = tomllib.loads(Path(args.file).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        print(f"lego workflows register: {args.file}: {exc}", file=sys.stderr)
        return 2
    declared = [f"[{table}.{name}]" for table in ("models", "adapters") for name in doc.get(table, {})]
    if declared:
        print(f"lego workflows register: {args.file} declares {', '.join(declared)}: the broker registers workflows "
              "over its catalog's models only (start the cluster with this file as --catalog instead)", file=sys.stderr)
        return 2
    tables = doc.get("workflows", {})
    wanted = args.workflow or list(tables)
    missing = [name for name in wanted if name not in tables]
    if not tables or missing:
        print(f"lego workflows register: {args.file} has no [workflows.{(missing or ['NAME'])[0]}] table",
              file=sys.stderr)
        return 2
    failed = 0
    with Client(args.broker, key_file=args.key_file) as client:
        for name in wanted:
            try:
                print(client.register_workflow(name, tables[name]).message)
            except LegoError as exc:
                print(f"lego workflows register: {name}: {exc}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


def cmd_status(args) -> int:
    try:
        with Client(args.broker, key_file=args.key_file) as client:
            stats = client.stats()
    except LegoError as exc:
        print(f"lego status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats.to_wire(), indent=2))
        return 0

    print("\n".join(status_lines(stats)))
    return 0


def _cluster_spec(args):
    from clients.local import LocalClusterSpec
    replicas = {k: int(v) for k, v in parse_options(args.replicas).items()}
    return LocalClusterSpec(
        workflows=args.workflow or ["flux-schnell-txt2img"], replicas=replicas, backend=args.backend,
        options=parse_options(args.option), emulate_gpus=args.emulate_gpus, catalog=args.catalog or [],
        frontend_port=args.port, backend_port=args.port + 1 if args.port else 0, run_dir=args.run_dir,
        log_format=args.log_format, log_level=args.log_level, scheduler=args.scheduler,
        scheduler_args=list(args.scheduler_arg), cfg_split=args.cfg_split, journal=args.journal or "",
    )


def _up_reporter(args):
    """How `lego up` tells its operator things on stderr: sentences on a console, or
    events when its logs are JSON (so every line of its stderr parses as JSON)."""

    configure_logging(args.log_format, args.log_level, process="up")
    if args.log_format != "json":
        return lambda event, text, **fields: print(text, file=sys.stderr)
    import structlog

    log = structlog.get_logger("lego.up")
    return lambda event, text, **fields: log.info(event, **fields)


def cmd_up(args) -> int:
    from clients.local import LocalCluster
    try:
        say = _up_reporter(args)
        cluster = LocalCluster(_cluster_spec(args))
    except (LegoError, ValueError) as exc:
        print(f"lego up: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        cluster.start()
        say("cluster_up", f"local cluster up: clients connect to {cluster.frontend} (logs in {cluster.run_dir}/logs)",
            frontend=cluster.frontend, logs=f"{cluster.run_dir}/logs")
        if args.generate:
            with Client(cluster.frontend) as client:
                job = client.submit(cluster.spec.workflows[0], prompt=args.generate, **_params(args))
                if args.log_format != "json":  # a progress bar is for a console
                    _print_progress(job)
                result = job.result(timeout=args.timeout)
            path = result.save_png(args.output)
            print(f"wrote {path} ({result.image.shape[1]}x{result.image.shape[0]}, seed {result.params.get('seed')}, "
                  f"{result.latency_s:.2f}s through the micro-served cluster)")
            return 0
        say("serving", "Ctrl-C stops everything this command started.")
        # Ctrl-C as an event, not a KeyboardInterrupt that could land anywhere in this loop
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        while not stop.is_set():  # short waits, so a signal is handled promptly
            stop.wait(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    except LegoError as exc:
        say("up_failed", f"lego up: {exc}", error=str(exc))
        return 1
    finally:
        cluster.stop()


def cmd_models(args) -> int:
    from actors.models.tiny import build_all
    catalog = build_all(args.dir, args.size)
    print(f"wrote {args.size} models and their catalog: {catalog}")
    print(f"serve them: lego up --backend diffusers --catalog {catalog} -w {args.size}-sd15-txt2img")
    return 0


def cmd_keys(args) -> int:
    """`lego keys init DIR` / `lego keys add DIR ROLE NAME`: CurveZMQ keys with roles."""
    try:
        if args.action == "init":
            paths = auth.make_cluster_keys(args.dir)
            print(f"wrote the broker's key, one key per role and {paths['authorized']} in {args.dir}")
            print(f"broker: lego broker --key-file {paths['broker']} --authorized-keys {paths['authorized']}")
            print(f"agents: lego agent --key-file {paths['agent']} --actor-key-file {paths['actor']}")
            print(f"scheduler: --key-file {paths['scheduler']}; operators: --key-file {paths['admin']}; "
                  f"applications: --key-file {paths['client']} (or LEGO_KEY_FILE)")
        else:
            path = auth.add_key(args.dir, args.role, args.name)
            print(f"wrote {path}; its public key is now authorized as {args.role} {args.name}")
    except (auth.KeyFileError, OSError) as exc:
        print(f"lego keys: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_bench(args) -> int:
    from clients.bench.overhead import run_overhead_bench
    return run_overhead_bench(args)


def cmd_bench_cluster(args) -> int:
    from clients.bench.cluster import (
        RATES,
        SHARING_RATES,
        BenchSettings,
        attainment_chart,
        cluster_table,
        parse_tenants,
        rate_loads,
        run_cluster_bench,
    )
    def numbers(text: str, cast) -> tuple:
        return tuple(cast(x) for x in text.split(",") if x.strip())

    sharing = args.setting == "sharing"
    rates = numbers(args.rates, float) if args.rates else (SHARING_RATES if sharing else RATES)
    settings = BenchSettings(setting=args.setting, systems=tuple(s for s in args.systems.split(",") if s), rates=rates,
                             bursts=numbers(args.bursts, int), gpus=args.gpus or (16 if sharing else 8),
                             time_scale=args.time_scale, trace_limit_s=args.trace_limit_s, traces=args.traces,
                             hosted_actors=not args.actor_processes,
                             payloads="real" if args.real_payloads else "virtual")
    if args.quick:
        settings.gpus, settings.rates, settings.bursts = 4, (1.0, 4.0), (1, 4)
        settings.trace_limit_s, settings.time_scale = 6.0, 0.2
    try:  # a tenant mapping or a trace that cannot be replayed fails before any cluster starts
        if args.tenants:
            settings.tenants = parse_tenants(args.tenants, load_catalog().workflows)
        rate_loads(settings)
    except ValueError as exc:
        print(f"lego bench cluster: {exc}", file=sys.stderr)
        return 2
    result = run_cluster_bench(settings)
    print(json.dumps(result, indent=2, default=str) if args.json else cluster_table(result))
    chart = attainment_chart(result, f"{args.plot}/slo_attainment_{args.setting}.png") if args.plot else None
    if args.record:
        command = "lego bench cluster " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "lego bench cluster"
        with open(args.record, "a") as out:
            out.write(f"\n### Micro-serving vs monolithic baselines, {args.setting} setting, emulated ({result['date']})\n\n"
                      f"Machine: {result['machine']}. Command: `{command}`. {result['gpus']} emulated H800s "
                      f"(profile times x {result['time_scale']:g}, arrivals compressed alike), real processes "
                      f"({'actors hosted in the node agent' if result['hosted_actors'] else 'a process per actor'}, "
                      f"{result['payloads']} payloads); "
                      f"took {result['wall_s']} s.\n\n{cluster_table(result)}\n")
            if chart:
                out.write(f"\n![SLO attainment vs rate scale]({chart})\n")
    return 0


def cmd_bench_simulate(args) -> int:
    from clients.bench.sim.bench import cli_main
    return cli_main(args.rest)


def cmd_bench_suite(args) -> int:
    from clients.bench.sim.suite import cli_main
    return cli_main(args.rest)


def cmd_bench_scheduler(args) -> int:
    from clients.bench.scheduler import run_scheduler_bench, scheduler_table
    result = run_scheduler_bench(args.time_scale, args.rounds, args.burst)
    print(json.dumps(result, indent=2) if args.json else scheduler_table(result))
    if args.record:
        command = f"lego bench scheduler --time-scale {args.time_scale:g} --rounds {args.rounds} --burst {args.burst}"
        with open(args.record, "a") as out:
            out.write(f"\n### Scheduler: parallel groups and scaling, emulated ({result['date']})\n\n"
                      f"Machine: {result['machine']}. Command: `{command}`. Emulated H800 GPUs (profile times x "
                      f"{args.time_scale:g}), real processes.\n\n{scheduler_table(result)}\n")
    return 0


def cmd_bench_lora(args) -> int:
    from clients.bench.lora import run_cli
    return run_cli(args, "lego bench lora " + " ".join(sys.argv[3:]))


def cmd_bench_chaos(args) -> int:
    from clients.bench.chaos import run_cli
    return run_cli(args, "lego bench chaos " + " ".join(sys.argv[3:]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lego", description="LegoDiffusion: micro-served diffusion workflows.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (("broker", "run the broker"), ("agent", "run this host's node agent"), ("actor", "run one model actor"),
                            ("scheduler", "run the scheduler actor (replicas, placement, admission, parallel groups)"),
                            ("gateway", "run the HTTP gateway (OpenAI images API, runs API, admin console, /metrics)")):
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

    g = sub.add_parser("generate", help="generate one image and write it as PNG")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("-w", "--workflow", default="flux-schnell-txt2img")
    g.add_argument("--seed", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--param", action="append", metavar="KEY=VALUE", help="any other workflow input")
    g.add_argument("--timeout", type=float, default=600.0)
    g.add_argument("--quiet", action="store_true")
    add_broker_flags(g)
    g.set_defaults(func=cmd_generate)

    w = sub.add_parser("workflows", help="list workflows and their inputs")
    w.add_argument("--json", action="store_true")
    w.add_argument("--offline", action="store_true", help="read the catalog here instead of asking the broker")
    w.add_argument("--catalog", action="append")
    add_broker_flags(w)
    w.set_defaults(func=cmd_workflows)
    wsub = w.add_subparsers(dest="workflows_action", required=False)
    imp = wsub.add_parser("import", help="a ComfyUI graph (API or UI format JSON) as a catalog workflow (docs/comfy.md)")
    imp.add_argument("graph", help="the graph's JSON file")
    imp.add_argument("--name", required=True, help="the workflow's name in the catalog")
    imp.add_argument("--models-dir", required=True,
                     help="a ComfyUI models folder (checkpoints/, diffusion_models/ or unet/, clip/ or text_encoders/, "
                          "vae/, loras/, controlnet/)")
    imp.add_argument("--catalog", action="append", help="catalogs whose models the graph may reuse (repeatable; "
                                                        "the built-in one always)")
    imp.add_argument("--out", help="the catalog file to write (default NAME.toml)")
    imp.add_argument("--replace", action="store_true", help="overwrite --out, and a workflow of that name")
    imp.add_argument("--json", action="store_true", help="print the result (or ComfyUI's node_errors) as JSON")
    imp.set_defaults(func=cmd_workflows_import)
    reg = wsub.add_parser("register", help="serve a catalog file's [workflows.*] from now on, at the running broker "
                                           "(over the models its catalog declares; an admin key with keys on)")
    reg.add_argument("file", help="a catalog TOML file holding [workflows.NAME] tables only")
    reg.add_argument("--workflow", action="append", help="only this one (repeatable; default: every one in the file)")
    add_broker_flags(reg)
    reg.set_defaults(func=cmd_workflows_register)

    s = sub.add_parser("status", help="the broker's telemetry snapshot")
    s.add_argument("--json", action="store_true")
    add_broker_flags(s)
    s.set_defaults(func=cmd_status)
    admin_cli.add_parsers(sub)

    u = sub.add_parser("up", help="a whole local cluster in the foreground")
    u.add_argument("-w", "--workflow", action="append", help="workflow to serve (repeatable)")
    u.add_argument("--replicas", action="append", metavar="MODEL=N", help="actors for a model (default 1)")
    u.add_argument("--backend", default="emulated")
    u.add_argument("--option", action="append", metavar="KEY=VALUE", help="backend option, e.g. time_scale=0.5")
    u.add_argument("--emulate-gpus", type=int, default=2)
    u.add_argument("--scheduler", action="store_true",
                   help="run the scheduler actor too (scaling, placement, admission, parallel CFG groups)")
    u.add_argument("--scheduler-arg", action="append", default=[], metavar="FLAG",
                   help="extra flag for lego scheduler (repeatable; e.g. --scheduler-arg=--admission=false)")
    u.add_argument("--cfg-split", choices=("never", "always", "auto"), default="never",
                   help="CFG branches as two tasks: never, always, or by load (auto; the scheduler sets auto)")
    u.add_argument("--catalog", action="append")
    u.add_argument("--port", type=int, default=5555, help="frontend port (backend is port+1); 0 picks free ports")
    u.add_argument("--run-dir", default="run/local")
    u.add_argument("--journal", metavar="PATH",
                   help="the broker's request journal (SQLite): accepted requests survive a broker restart")
    u.add_argument("--generate", metavar="PROMPT", help="generate one image, write it, stop the cluster")
    u.add_argument("-o", "--output", default="out.png")
    u.add_argument("--seed", type=int)
    u.add_argument("--steps", type=int)
    u.add_argument("--width", type=int)
    u.add_argument("--height", type=int)
    u.add_argument("--param", action="append", metavar="KEY=VALUE")
    u.add_argument("--timeout", type=float, default=600.0)
    u.add_argument("--log-format", default="console", choices=("console", "json"),
                   help="of this command's stderr and every process it starts")
    u.add_argument("--log-level", default="info")
    u.set_defaults(func=cmd_up)

    k = sub.add_parser("keys", help="CurveZMQ keys with roles for a cluster with keys on")
    keys = k.add_subparsers(dest="action", required=True)
    init = keys.add_parser("init", help="the broker's key, one key per role, the authorized list (0600, in DIR)")
    init.add_argument("dir")
    add = keys.add_parser("add", help="one more key (e.g. a client application's), authorized at the broker")
    add.add_argument("dir")
    add.add_argument("role", choices=auth.ROLES)
    add.add_argument("name")
    k.set_defaults(func=cmd_keys)

    m = sub.add_parser("models", help="build model components offline")
    msub = m.add_subparsers(dest="models", required=True)
    t = msub.add_parser("tiny", help="real diffusers components with random weights, small configs")
    t.add_argument("dir")
    t.add_argument("--size", choices=("tiny", "mid"), default="tiny")
    t.set_defaults(func=cmd_models)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    cb = bsub.add_parser("cluster", help="micro-serving vs monolithic baselines on an emulated cluster (the paper's setting)")
    cb.add_argument("--setting", choices=("paper", "sharing"), default="paper",
                    help="paper: 8 GPUs, 3 Flux workflows, the traces; sharing: 16 GPUs, 6 SD3/SD3.5L/Flux-dev "
                         "ControlNet workflows, Gamma arrivals (CV 2)")
    cb.add_argument("--systems", default="lego,basic,shepherd,clockwork", help="comma-separated")
    cb.add_argument("--rates", help="paper: trace rate scales (default 0.5,1,2,3,4,6,8); sharing: requests/s "
                                    "(default 0.25,0.5,1,1.5,2,3)")
    cb.add_argument("--bursts", default="1,2,4,6,8,10,12,16,24,32,48", help="burst sizes, comma-separated ('' for none)")
    cb.add_argument("--gpus", type=int, help="default 8 (paper), 16 (sharing)")
    cb.add_argument("--time-scale", type=float, default=0.25, help="emulated times and arrival gaps x this")
    cb.add_argument("--trace-limit-s", type=float, help="replay only the first seconds of each trace")
    cb.add_argument("--traces", metavar="FILE|DIR",
                    help="replay these traces (TENANT GAP_SECONDS lines; a folder: its *.txt files) instead of the "
                         "rate sweep, each at its offered requests/s")
    cb.add_argument("--tenants", metavar="A=WORKFLOW,...",
                    help="trace tenants -> workflows (default: A, B, C -> the paper's three FLUX.1-schnell workflows)")
    cb.add_argument("--quick", action="store_true", help="CI check of the harness: 4 GPUs, 6 s of two traces, small bursts")
    cb.add_argument("--actor-processes", action="store_true",
                    help="a process per emulated actor, as on a GPU node (default: the node agent hosts them on "
                         "threads of its own process, sparing the cores the emulation runs on)")
    cb.add_argument("--real-payloads", action="store_true",
                    help="micro-serving's actors move tensors of the real sizes through this machine's memory "
                         "(default: virtual payloads, each fetch priced as on a GPU host)")
    cb.add_argument("--json", action="store_true")
    cb.add_argument("--plot", metavar="DIR", help="write the SLO-attainment chart (PNG) there")
    cb.add_argument("--record", metavar="FILE", help="append the tables to FILE (docs/benchmarks.md)")
    cb.set_defaults(func=cmd_bench_cluster)
    sim = bsub.add_parser("simulate", help="the same broker and scheduler code in virtual time (hundreds of GPUs)",
                          add_help=False)
    sim.add_argument("rest", nargs=argparse.REMAINDER)
    sim.set_defaults(func=cmd_bench_simulate)
    suite = bsub.add_parser("suite", help="issue 14's acceptance suite, simulated: generated Gamma traces and bursts, "
                                          "every system, both settings, beside the on-time reference", add_help=False)
    suite.add_argument("rest", nargs=argparse.REMAINDER)
    suite.set_defaults(func=cmd_bench_suite)
    sb = bsub.add_parser("scheduler", help="parallel groups and scaling on 8 emulated H800s (the paper's Flux workflows)")
    sb.add_argument("--time-scale", type=float, default=0.5, help="emulated times x this")
    sb.add_argument("--rounds", type=int, default=5, help="idle requests per mode")
    sb.add_argument("--burst", type=int, default=24)
    sb.add_argument("--json", action="store_true")
    sb.add_argument("--record", metavar="FILE", help="append the table to FILE (docs/benchmarks.md)")
    sb.set_defaults(func=cmd_bench_scheduler)
    lb = bsub.add_parser("lora", help="LoRA adapter affinity on vs off: many tenants' adapters over SD3 (emulated H800s)")
    lb.add_argument("--gpus", type=int, help="emulated H800s, one SD3 actor on each (default 4)")
    lb.add_argument("--rates", help="offered requests/s (H800 time), comma-separated (default 2.6,1.0)")
    lb.add_argument("--residencies", help="lora_resident variants, comma-separated (default 8,2)")
    lb.add_argument("--adapters", type=int, help="registered adapters (default 32)")
    lb.add_argument("--window-s", type=float, help="arrival window, H800 seconds (default 60)")
    lb.add_argument("--time-scale", type=float, help="emulated times and arrival gaps x this (default 0.25)")
    lb.add_argument("--quick", action="store_true", help="CI check: 2 GPUs, a few seconds of arrivals")
    lb.add_argument("--json", action="store_true")
    lb.add_argument("--record", metavar="FILE", help="append the table to FILE (docs/benchmarks.md)")
    lb.set_defaults(func=cmd_bench_lora)
    ch = bsub.add_parser("chaos", help="faults (actor, agent, broker killed or stopped; 5x overload) under load on an "
                                       "emulated cluster: every request completed, failed typed, or counted lost")
    ch.add_argument("--scenarios", help="comma-separated (default: all; see docs/reliability.md)")
    ch.add_argument("--rate-per-s", type=float, help="offered requests/s, Poisson (default 4)")
    ch.add_argument("--load-s", type=float, help="seconds of arrivals per scenario (default 20)")
    ch.add_argument("--time-scale", type=float, help="emulated model times x this (default 1)")
    ch.add_argument("--seed", type=int)
    ch.add_argument("--admission-bound", choices=("max", "sum", "lookahead"),  # broker.core.rules.ADMISSION_BOUNDS
                    help="overload: the broker's admission bound (default: the chaos bench's, see docs/reliability.md)")
    ch.add_argument("--admission-overhead-s", type=float, help="overload: the broker's admission_overhead_s (default 0)")
    ch.add_argument("--run-dir", help="clusters' logs here (default: a fresh temporary directory)")
    ch.add_argument("--quick", action="store_true", help="CI check: 5 s of load per scenario, every scenario")
    ch.add_argument("--json", action="store_true")
    ch.add_argument("--record", metavar="FILE", help="append the table to FILE (docs/reliability.md)")
    ch.set_defaults(func=cmd_bench_chaos)
    o = bsub.add_parser("overhead", help="broker dispatch throughput and hop latency with no-op actors")
    o.add_argument("--actors", type=int, default=2)
    o.add_argument("--max-batch-rows", type=int, default=64)
    o.add_argument("--requests", type=int, default=400)
    o.add_argument("--steps", type=int, help="steps per request (default 48; --step-shapes: 20)")
    o.add_argument("--rate", type=float, default=1000.0, help="offered tasks/s for the latency run")
    o.add_argument("--latency-seconds", type=float, default=5.0)
    o.add_argument("--json", action="store_true")
    o.add_argument("--record", metavar="FILE", help="append the table to this markdown file")
    o.add_argument("--real", action="store_true",
                   help="instead: a micro-served mid SD 1.5 image vs the in-process diffusers pipeline")
    o.add_argument("--models-dir", default="run/models/mid", help="--real: where the mid models are (built if missing)")
    o.add_argument("--rounds", type=int, default=5, help="--real: images per side")
    o.add_argument("--step-shapes", metavar="FAMILIES",
                   help="instead: per-step overhead with full-size tensors of these families (sd15,sdxl,sd3,flux)")
    o.add_argument("--repeats", type=int, default=5, help="--step-shapes: timed requests per family (median)")
    o.set_defaults(func=cmd_bench)
    return parser


def _process_main(name: str):
    """A process's entry point, imported only when that process starts: each loads its
    own stack (the gateway aiohttp, the actor its backends), none of which `lego` needs."""
    if name == "broker":
        from broker.server import main
    elif name == "agent":
        from actors.agent import main
    elif name == "actor":
        from actors.runtime import main
    elif name == "scheduler":
        from scheduler.controller import main
    else:
        from clients.gateway.server import main
    return main


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("broker", "agent", "actor", "scheduler", "gateway"):  # process entry points parse their own flags
        _process_main(argv[0])(argv[1:])
        return
    if argv[:2] == ["bench", "simulate"]:  # it parses its own flags (argparse cannot pass them through)
        from clients.bench.sim.bench import cli_main

        sys.exit(cli_main(argv[2:]))
    if argv[:2] == ["bench", "suite"]:  # likewise
        from clients.bench.sim.suite import cli_main as suite_main

        sys.exit(suite_main(argv[2:]))
    args = build_parser().parse_args(argv)
    # A command's own output is stdout (tables, --json); the client library's log lines
    # (a resubmit, an unreachable broker) go to stderr, warnings and worse only. A command
    # that runs processes (`lego up`) configures its own logging.
    configure_logging("console", "warning")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
