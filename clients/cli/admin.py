"""`lego admin ...` and `lego top`: the operator's commands, each a thin front for a
`Client` call (the same calls the gateway's console makes).

    lego admin drain|undrain|stop ACTOR_ID
    lego admin scale MODEL [--min N] [--max M] [--clear]
    lego admin pause|resume WORKFLOW
    lego top [--once] [--interval-s S]
"""

from __future__ import annotations

import argparse
import sys

from clients import Client, LegoError
from clients.cli.top import run_top

ACTOR_ACTIONS = {
    "drain": ("drain_actor", "no new work for the actor; it stays alive (and serves what it holds) until undrained"),
    "undrain": ("undrain_actor", "give a drained actor work again"),
    "stop": ("stop_actor", "drain the actor, then have its node agent stop it once it holds nothing needed"),
}
WORKFLOW_ACTIONS = {
    "pause": ("pause_workflow", "reject the workflow's new requests (code 'paused'); accepted ones run on"),
    "resume": ("resume_workflow", "admit the workflow's requests again"),
}


def add_broker_flags(parser) -> None:
    """Where the broker is, and this client's key when the cluster's keys are on."""
    parser.add_argument("--broker", help="broker frontend address (default $LEGO_BROKER or tcp://127.0.0.1:5555)")
    parser.add_argument("--key-file", help="keys on: this client's key file (default $LEGO_KEY_FILE)")


def add_parsers(sub) -> None:
    admin = sub.add_parser("admin", help="operator actions: drain/undrain/stop an actor, replica bounds, "
                                         "pause/resume a workflow")
    actions = admin.add_subparsers(dest="action", required=True)
    for name, (_, help_text) in ACTOR_ACTIONS.items():
        a = actions.add_parser(name, help=help_text)
        a.add_argument("actor_id")
        add_broker_flags(a)
        a.set_defaults(func=cmd_admin)
    scale = actions.add_parser("scale", help="a model's replica bounds for the scheduler (over its --model-min/"
                                             "--model-max flags)")
    scale.add_argument("model")
    scale.add_argument("--min", type=int, help="at least this many replicas")
    scale.add_argument("--max", type=int, help="at most this many replicas")
    scale.add_argument("--clear", action="store_true", help="drop the operator's bounds: the scheduler's flags apply")
    add_broker_flags(scale)
    scale.set_defaults(func=cmd_admin)
    for name, (_, help_text) in WORKFLOW_ACTIONS.items():
        w = actions.add_parser(name, help=help_text)
        w.add_argument("workflow")
        add_broker_flags(w)
        w.set_defaults(func=cmd_admin)

    top = sub.add_parser("top", help="a live full-screen view of the cluster (q quits)")
    top.add_argument("--once", action="store_true", help="print one screen and exit (also when not on a terminal)")
    top.add_argument("--interval-s", type=float, default=1.0, help="seconds between refreshes")
    add_broker_flags(top)
    top.set_defaults(func=cmd_top)


def admin_call(client, args: argparse.Namespace):
    """The Client call an `lego admin` command line asks for; ValueError for a bad one."""
    if args.action in ACTOR_ACTIONS:
        return getattr(client, ACTOR_ACTIONS[args.action][0])(args.actor_id)
    if args.action in WORKFLOW_ACTIONS:
        return getattr(client, WORKFLOW_ACTIONS[args.action][0])(args.workflow)
    if args.clear and (args.min is not None or args.max is not None):
        raise ValueError("--clear: drops both bounds; give it without --min/--max")
    if not args.clear and args.min is None and args.max is None:
        raise ValueError("--min/--max: give at least one (or --clear)")
    return client.set_replicas(args.model, min=args.min, max=args.max)


def cmd_admin(args: argparse.Namespace) -> int:
    try:
        with Client(args.broker, key_file=args.key_file) as client:
            reply = admin_call(client, args)
    except (LegoError, ValueError) as exc:
        print(f"lego admin {args.action}: {exc}", file=sys.stderr)
        return 1
    print(reply.message)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    if args.interval_s <= 0:
        print("lego top: --interval-s: must be > 0", file=sys.stderr)
        return 1
    with Client(args.broker, key_file=args.key_file) as client:
        return run_top(client, args.interval_s, args.once)
