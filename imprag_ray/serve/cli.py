"""``imprag serve`` command line.

    imprag serve --config jobs/serve_tiny_synth.yaml [key.sub=value ...] [--address ADDR]
    imprag serve reload --checkpoint DIR --index DIR [--address ADDR] [--app-name NAME]
    imprag serve status [--address ADDR] [--app-name NAME]

``--address``: the Ray cluster (``auto``, ``HOST:PORT``); ``imprag serve`` without it
starts a local Ray instance in this process and prints its address for ``reload``.

``reload`` prints the swap record and exits 0; when the swap fails (a replica cannot load
the new version, or a step times out) it prints Control's error on one line and exits 1,
as soon as a replica reports the failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ACTIONS = ("reload", "status")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="online serving on Ray Serve (OpenAI API); 'serve reload' hot-swaps the checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None, help="serve job YAML (jobs/serve_*.yaml)")
    p.add_argument("--checkpoint", type=Path, default=None, help="reload: the new checkpoint dir")
    p.add_argument("--index", type=Path, default=None, help="reload: the index built from it")
    p.add_argument("--address", default=None, help="Ray cluster address (auto, HOST:PORT)")
    p.add_argument("--app-name", default="imprag", help="Serve application name (reload/status)")
    p.add_argument("args", nargs="*", help="'reload' | 'status' | key.sub=value overrides")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    action = args.args[0] if args.args and args.args[0] in ACTIONS else None
    if action == "reload":
        return _reload(args)
    if action == "status":
        return _status(args)
    if args.config is None:
        raise ValueError(
            "--config is required: imprag serve --config jobs/serve_tiny_synth.yaml [key=value ...]"
        )
    bad = [a for a in args.args if "=" not in a]
    if bad:
        raise ValueError(f"unexpected argument {bad[0]!r}: use 'reload', 'status' or key.sub=value overrides")
    from imprag_ray.serve.app import load_serve_config, run

    cfg = load_serve_config(args.config, args.args)
    run(cfg, blocking=True, address=args.address)
    return 0


def _reload(args) -> int:
    if args.checkpoint is None or args.index is None:
        raise ValueError(
            "serve reload needs --checkpoint DIR and --index DIR (the index built from that checkpoint)"
        )
    for flag, path in (("--checkpoint", args.checkpoint), ("--index", args.index)):
        if not path.is_dir():
            raise FileNotFoundError(f"{flag}: directory not found: {path.resolve()}")
    from imprag_ray.serve.app import reload

    try:
        record = reload(str(args.checkpoint), str(args.index), app_name=args.app_name, address=args.address)
    except Exception as err:
        cause = _cause(err)
        # A version Control refuses (index of another checkpoint, model mismatch) is a user
        # mistake: exit 2 as main does; a swap that failed in the replicas exits 1.
        mistake = isinstance(cause, (ValueError, FileNotFoundError))
        what = "error" if mistake else "failed"
        print(f"imprag serve reload: {what}: {_one_line(cause)}", file=sys.stderr)
        return 2 if mistake else 1
    print(json.dumps(record, indent=2))
    return 0


def _cause(err: BaseException) -> BaseException:
    """The exception raised in Control: a Serve handle call wraps it in RayTaskError, whose
    ``cause`` is the original."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _status(args) -> int:
    from ray import serve

    from imprag_ray.serve.app import connect

    connect(args.address)
    handle = serve.get_deployment_handle("Control", app_name=args.app_name)
    print(json.dumps(handle.status.remote().result(timeout_s=60), indent=2, default=str))
    return 0
