"""The ``retrieval`` command line: build, serve-test, evaluate and tune candidate retrieval."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from retrieval.config import RetrievalConfig, load_config
from retrieval.errors import InputError, RetrievalError, exit_code
from retrieval.redact import redact, redact_text

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]

_BROKEN_PIPE = 128 + getattr(signal, "SIGPIPE", 13)  # what a shell reports for `... | head`


def _validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    dumped = config.model_dump(mode="json")
    if config.store.url:
        dumped["store"]["url"] = redact(config.store.url)  # never print a password
    print(json.dumps(dumped, indent=2))
    print(f"{args.config}: ok ({len(config.sources)} sources)", file=sys.stderr)
    return 0


def _blend(args: argparse.Namespace) -> int:
    from retrieval.online.retriever import Retriever

    user: int | str = int(args.user) if args.user.lstrip("-").isdigit() else args.user
    history = [int(h) if h.lstrip("-").isdigit() else h for h in args.history or []]
    context = dict(args.context or [])
    with Retriever.from_yaml(args.config) as retriever:
        result = retriever.blend(user_id=user, history=history, k=args.k, context=context)
    if args.json:
        print(result.to_json())
        return 0
    shown = min(len(result), args.show)
    print(
        f"{len(result)} candidates in {result.elapsed_ms:.2f} ms (showing {shown}); "
        f"store {result.store_status}" + (", from the result cache" if result.cache_hit else "")
    )
    for c in list(result)[:shown]:
        prov = ", ".join(f"{name}#{rank}" for name, rank in c.ranks.items())
        print(f"  {c.item_id!s:>14}  {c.score:9.5f}  {prov}")
    print("sources:")
    for r in result.reports:
        extra = f"  ({r.error})" if r.error else ""
        print(
            f"  {r.name:<16} {r.status.value:<12} {r.latency_ms:8.2f} ms  "
            f"returned {r.returned:>5}  kept {r.survived:>5}{extra}"
        )
    return 0


def _artifacts_dir(config: RetrievalConfig) -> Path:
    """Where outputs go when no --out is given: the config's own artifacts directory."""
    if config.artifacts is None:
        raise InputError("no --out given and the config sets no 'artifacts:' directory")
    return config.resolve_path(config.artifacts)


def _build(args: argparse.Namespace) -> int:
    from retrieval.offline.build import build, format_summary

    config = load_config(args.config)
    out = args.out or _artifacts_dir(config)
    t0 = time.perf_counter()
    rows = build(config, args.events, out, only=args.only)
    from retrieval.artifacts import open_artifacts

    counts = open_artifacts(out).counts
    print(format_summary(rows, counts.get("events", 0), counts.get("items", 0)))
    print(f"built {len(rows)} sources into {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _push(args: argparse.Namespace) -> int:
    from retrieval.offline.push import push

    config = load_config(args.config)
    url = args.url or config.store.url
    if not url:
        raise InputError("no --url given and the config's store has no url (store.kind: redis)")
    t0 = time.perf_counter()
    results = push(config, args.artifacts, url, only=args.only)
    for r in results:
        print(
            f"  {r.source:<16} version {r.version}  {r.rows:>9,} rows  "
            f"{r.bytes / 1e6:8.1f} MB  {r.deleted:>9,} old keys deleted  {r.seconds:6.1f}s"
        )
    print(f"pushed {len(results)} sources to {redact(url)} in {time.perf_counter() - t0:.1f}s")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from retrieval.online.retriever import Retriever
    from retrieval.tools.bench import (
        exact_reference,
        format_result,
        run_bench,
        run_bench_processes,
        sample_requests,
    )

    config = load_config(args.config)
    artifacts = args.artifacts.resolve()
    config = config.model_copy(update={"artifacts": artifacts})
    t0 = time.perf_counter()
    requests = sample_requests(config, artifacts, args.events, args.requests, seed=args.seed)
    print(f"sampled {len(requests)} requests in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.processes > 1:
        result = run_bench_processes(config, requests, args.concurrency, args.processes)
    if args.processes == 1 or args.exact_queries > 0:
        # Here only when something runs in this process: loading reads every artifact file.
        t0 = time.perf_counter()
        with Retriever(config) as retriever:
            print(f"loaded the retriever in {time.perf_counter() - t0:.2f}s", flush=True)
            if args.processes == 1:
                result = run_bench(retriever, requests, args.concurrency)
            if args.exact_queries > 0:
                result.exact = exact_reference(
                    retriever, requests, config.k, max_queries=args.exact_queries
                )
    out = result.to_dict()
    print(format_result(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from retrieval.tools.doctor import doctor

    print(doctor(items=args.items, queries=args.queries))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from retrieval.tools.synth import synthesize

    fmt: Literal["csv", "parquet"] = "csv" if ".csv" in args.out.name else "parquet"
    stats = synthesize(
        args.out,
        n_items=args.items,
        n_users=args.users,
        n_events=args.events,
        seed=args.seed,
        fmt=fmt,
        progress=sys.stderr.isatty(),
    )
    print(
        f"wrote {stats.n_events:,} events ({stats.n_active_users:,} active users, "
        f"{stats.n_items:,} items, {stats.n_sessions:,} sessions, {stats.n_clusters} clusters) "
        f"in {stats.seconds:.1f}s"
    )
    for label, path in (
        ("events", stats.events_path),
        ("items", stats.items_path),
        ("embeddings", stats.embeddings_path),
        ("embedding ids", stats.embedding_ids_path),
    ):
        print(f"  {label:<14} {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from retrieval.evaluation.evaluate import evaluate, format_report, load_for_eval, report_data

    config = load_config(args.config)
    split, path = load_for_eval(
        config, args.events, args.train, args.test, args.split_time, args.test_fraction, args.users
    )
    report = evaluate(config, split, path, args.k)
    print(format_report(report))
    print(f"evaluated in {report.seconds:.1f}s")
    _write_outputs(args, report.to_dict(), lambda t, s: report_data(report, t, s))
    return 0


def _write_outputs(
    args: argparse.Namespace,
    data: dict[str, Any],
    report: Callable[[str, str], dict[str, Any]],
) -> None:
    """``--json`` and ``--report``, the same for every command that measures."""
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
        print(f"wrote {args.json}")
    if args.report:
        from retrieval.evaluation.report import ReportData, write_report

        title = f"retrieval {args.command} {args.config.name}"
        command = "retrieval " + " ".join(sys.argv[1:])
        write_report(args.report, cast("ReportData", report(title, command)))
        print(f"wrote {args.report}")


def _tune(args: argparse.Namespace) -> int:
    from retrieval.evaluation.tune import blend_depths, tune, write_tuned_yaml

    config = load_config(args.config)
    result = tune(
        config,
        args.events,
        budget_minutes=args.budget_minutes,
        seed=args.seed,
        holdout=args.holdout,
        users=args.users,
    )
    write_tuned_yaml(result, config, args.out, "retrieval " + " ".join(sys.argv[1:]))
    print(f"{'trial':>5}  {'stage':<6} {'source':<12} {'recall':>8} {'s':>6}  change")
    for i, t in enumerate(result.trials):
        mark = "*" if t.chosen else " "
        print(
            f"{i:>5}{mark} {t.stage:<6} {t.source or '-':<12} {t.recall:>8.4f} "
            f"{t.seconds:>6.1f}  {t.note}"
        )
    k = result.k
    depths = ", ".join(f"@{d}" for d in blend_depths(k))
    print(f"(source trials: recall@{k}; blend trials: recall averaged over {depths})")
    print(f"validation recall@{k} ({result.users} users), as configured -> tuned:")
    for name, after in result.after.items():
        print(f"  {name:<14} {result.before.get(name, float('nan')):.4f} -> {after:.4f}")
    if result.budget_exhausted:
        print(f"the {args.budget_minutes:g}-minute budget cut the search short")
    print(f"tuned in {result.seconds / 60:.1f} min; wrote {args.out}")
    _write_outputs(args, result.to_dict(), result.report_data)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from blender.calibration import CALIBRATION_FILE
    from retrieval.evaluation.evaluate import calibrate
    from retrieval.offline.build import needed_segments
    from retrieval.offline.events import read_events

    config = load_config(args.config)
    out = args.out or _artifacts_dir(config) / CALIBRATION_FILE
    events = read_events(args.events, config.events.columns, needed_segments(config))
    calibration = calibrate(
        config,
        events,
        args.events,
        k=args.k or config.k,
        holdout_fraction=args.holdout,
        max_users=args.users,
        progress=sys.stderr.isatty(),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    calibration.save(out)
    print(f"rank -> hit-rate curves from {calibration.users} hold-out users:")
    for name, curve in calibration.curves.items():
        points = ", ".join(
            f"r{e}:{p:.4f}" for e, p in list(zip(curve.edges, curve.p, strict=True))[:8]
        )
        print(f"  {name:<14} {points} ...")
    print(f"wrote {out}; use it with blend.strategy: calibrated")
    return 0


def _k_list(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"k values must be positive, got {text!r}")
    return ks


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected minutes, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, got {text}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. country=de), got {text!r}")
    return key, value


def _positive(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


EPILOG = f"""\
exit codes:
  0    ok
  1    a failure at run time (e.g. a required source failed); with a traceback: a bug
  2    bad input: a config, an events file, an id, an argument (usage errors included)
  3    artifacts missing, made for another config, stale or corrupt: rebuild them
  4    the online store (Redis) failed or holds foreign data
  130  interrupted (Ctrl-C)
  {_BROKEN_PIPE}  the output was closed early (e.g. `retrieval ... | head`); nothing is printed
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retrieval",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a config; print it resolved, or the errors")
    v.add_argument("config", type=Path)
    v.set_defaults(handler=_validate)

    b = sub.add_parser("blend", help="blend candidates for one user")
    b.add_argument("config", type=Path)
    b.add_argument("--user", required=True)
    b.add_argument("--history", nargs="*", help="recent item ids, oldest first")
    b.add_argument(
        "--context", nargs="*", type=_key_value, help="segment values as KEY=VALUE: country=de"
    )
    b.add_argument("--k", type=int, default=None)
    b.add_argument("--show", type=int, default=20, help="rows to print without --json")
    b.add_argument("--json", action="store_true")
    b.set_defaults(handler=_blend)

    sy = sub.add_parser("synth", help="write a realistic synthetic event log")
    sy.add_argument("--items", type=_positive, required=True)
    sy.add_argument("--users", type=_positive, required=True)
    sy.add_argument("--events", type=_positive, required=True)
    sy.add_argument("--out", type=Path, required=True, help=".parquet, .csv or .csv.gz")
    sy.add_argument("--seed", type=int, default=0)
    sy.set_defaults(handler=_synth)

    ev = sub.add_parser("eval", help="offline recall per source and for the blend")
    ev.add_argument("config", type=Path)
    ev.add_argument("--events", type=Path)
    ev.add_argument("--split-time", help="cutoff: unix seconds or ISO-8601")
    ev.add_argument("--test-fraction", type=float, help="the last fraction of the log is test")
    ev.add_argument("--train", type=Path, help="a split you already have (with --test)")
    ev.add_argument("--test", type=Path)
    ev.add_argument("--k", type=_k_list, default=[20, 100, 1000])
    ev.add_argument("--users", type=_positive, default=2000, help="test users sampled")
    ev.add_argument("--json", type=Path, help="also write the metrics as JSON")
    ev.add_argument("--report", type=Path, help="also write a self-contained HTML report")
    ev.set_defaults(handler=_eval)

    tu = sub.add_parser(
        "tune",
        help="fit every source's parameters and the blend to your log; write a tuned config",
        description="Split LOG by time into a fit part and a validation part, search each "
        "learned source's parameters by its validation recall at the config's k, then the "
        "blend's, and write the tuned config (a complete YAML file, with what was measured "
        "as comments).",
    )
    tu.add_argument("config", type=Path)
    tu.add_argument("--events", type=Path, required=True, help="CSV or Parquet event log")
    tu.add_argument("--out", type=Path, required=True, help="where to write TUNED.yaml")
    tu.add_argument(
        "--budget-minutes",
        type=_minutes,
        default=15.0,
        help="stop searching when this is spent (the best found so far is kept)",
    )
    tu.add_argument("--seed", type=int, default=0, help="validation users and cut points")
    tu.add_argument("--holdout", type=float, default=0.1, help="last fraction of the log's time")
    tu.add_argument("--users", type=_positive, default=2000, help="validation users scored")
    tu.add_argument("--json", type=Path, help="also write every trial as JSON")
    tu.add_argument("--report", type=Path, help="also write a self-contained HTML report")
    tu.set_defaults(handler=_tune)

    ca = sub.add_parser(
        "calibrate", help="measure rank -> hit-rate curves for blend.strategy: calibrated"
    )
    ca.add_argument("config", type=Path)
    ca.add_argument("--events", type=Path, required=True)
    ca.add_argument("--holdout", type=float, default=0.1, help="last fraction of the log held out")
    ca.add_argument("--users", type=_positive, default=2000)
    ca.add_argument("--k", type=_positive, default=None)
    ca.add_argument("--out", type=Path, default=None, help="default: <artifacts>/calibration.json")
    ca.set_defaults(handler=_calibrate)

    bd = sub.add_parser("build", help="build the artifacts of every source that learns")
    bd.add_argument("config", type=Path)
    bd.add_argument("--events", type=Path, required=True, help="CSV or Parquet event log")
    bd.add_argument("--out", type=Path, default=None, help="default: the config's artifacts")
    bd.add_argument(
        "--only",
        nargs="*",
        help="build only these sources; every other source of the build already in the output "
        "directory is kept as it was (its files hard-linked into the new build with their "
        "checksums). Refused when this event log gives other id maps (ids/items.npy, "
        "ids/users.npy) than that build: then build every source. Files the manifest does not "
        "list (e.g. calibration.json) are not kept",
    )
    bd.set_defaults(handler=_build)

    pu = sub.add_parser("push", help="upload co-visitation and item-CF neighbour lists to Redis")
    pu.add_argument("config", type=Path)
    pu.add_argument("--artifacts", type=Path, required=True, help="the output of `build`")
    pu.add_argument("--url", default=None, help="default: the config's store.url")
    pu.add_argument("--only", nargs="*", help="push only these sources")
    pu.set_defaults(handler=_push)

    be = sub.add_parser("bench", help="replay requests against built artifacts; time everything")
    be.add_argument("config", type=Path)
    be.add_argument("--artifacts", type=Path, required=True, help="the output of `build`")
    be.add_argument("--events", type=Path, default=None, help="log to sample requests from")
    be.add_argument("--requests", type=_positive, default=2000)
    be.add_argument("--concurrency", type=_positive, default=1, help="threads per process")
    be.add_argument(
        "--processes",
        type=_positive,
        default=1,
        help="serving processes sharing the mmapped artifacts (one per core uses every core)",
    )
    be.add_argument("--exact-queries", type=int, default=200, help="0: skip exact search")
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--json", type=Path, default=None)
    be.set_defaults(handler=_bench)

    dr = sub.add_parser("doctor", help="threads, BLAS, versions, CPU flags, GIL release")
    dr.add_argument("--items", type=_positive, default=200_000, help="GIL test index size")
    dr.add_argument("--queries", type=_positive, default=400)
    dr.set_defaults(handler=_doctor)
    return p


def _expected_exit_code(exc: BaseException) -> int | None:
    """The exit code of an error raised on purpose; None for a bug."""
    if isinstance(exc, RetrievalError):
        return exit_code(exc)
    if isinstance(exc, FileNotFoundError):  # a path given on the command line
        return 2
    return None


def _silence_stdout() -> None:
    """After EPIPE: point stdout at devnull, so the interpreter's last flush does not raise
    again (the handling the Python docs recommend for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (e.g. in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except BrokenPipeError:  # `retrieval ... | head`: the reader left; nothing to report
        _silence_stdout()
        return _BROKEN_PIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code = _expected_exit_code(exc)
        if code is None:  # a bug: show where, with any URL's password redacted
            print(redact_text(traceback.format_exc()), file=sys.stderr, end="")
            print(
                "error: the traceback above is a bug in retrieval (or in a plugin source); "
                "please report it",
                file=sys.stderr,
            )
            return 1
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
