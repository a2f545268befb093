"""The ``retrieval`` command line: build, serve-test, evaluate and tune candidate retrieval.

Conventions, the same for every command: the result goes to stdout, progress bars and log
lines ("wrote ...", timings) to stderr; ``--json`` prints the result as one JSON document on
stdout instead of the human-readable text; ``--json-out PATH`` (the commands that measure:
eval, tune, bench) also writes that document to a file; the exit code says what failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from retrieval.config import RetrievalConfig, load_config
from retrieval.errors import InputError, RetrievalError, exit_code
from retrieval.redact import redact, redact_text

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]

_BROKEN_PIPE = 128 + getattr(signal, "SIGPIPE", 13)  # what a shell reports for `... | head`


def _json_default(value: Any) -> Any:
    """What ``json`` cannot encode by itself: numpy scalars and arrays, paths."""
    if hasattr(value, "tolist"):  # numpy scalar or array
        return value.tolist()
    return str(value)


def _print_json(data: Any) -> None:
    """A command's result in its machine-readable form: one JSON document on stdout."""
    print(json.dumps(data, indent=2, default=_json_default))


def _log(message: str) -> None:
    """A progress or log line: stderr, so that stdout holds only the result."""
    print(message, file=sys.stderr, flush=True)


def _validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    dumped = config.model_dump(mode="json")
    if config.store.url:
        dumped["store"]["url"] = redact(config.store.url)  # never print a password
    if args.json:
        _print_json(dumped)
    else:
        import yaml

        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        print(yaml.dump(dumped, Dumper=dumper, sort_keys=False, allow_unicode=True).rstrip("\n"))
    _log(f"{args.config}: ok ({len(config.sources)} sources)")
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
    seconds = time.perf_counter() - t0
    n_events, n_items = counts.get("events", 0), counts.get("items", 0)
    if args.json:
        _print_json(
            {
                "out": str(out),
                "events": n_events,
                "items": n_items,
                "seconds": seconds,
                "sources": [dataclasses.asdict(r) for r in rows],
            }
        )
    else:
        print(format_summary(rows, n_events, n_items))
    _log(f"built {len(rows)} sources into {out} in {seconds:.1f}s")
    return 0


def _push(args: argparse.Namespace) -> int:
    from retrieval.offline.push import push

    config = load_config(args.config)
    url = args.url or config.store.url
    if not url:
        raise InputError("no --url given and the config's store has no url (store.kind: redis)")
    t0 = time.perf_counter()
    results = push(config, args.artifacts, url, only=args.only)
    seconds = time.perf_counter() - t0
    if args.json:
        _print_json(
            {
                "url": redact(url),
                "seconds": seconds,
                "sources": [dataclasses.asdict(r) for r in results],
            }
        )
    else:
        for r in results:
            print(
                f"  {r.source:<16} version {r.version}  {r.rows:>9,} rows  "
                f"{r.bytes / 1e6:8.1f} MB  {r.deleted:>9,} old keys deleted  {r.seconds:6.1f}s"
            )
    _log(f"pushed {len(results)} sources to {redact(url)} in {seconds:.1f}s")
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
    _log(f"sampled {len(requests)} requests in {time.perf_counter() - t0:.1f}s")
    if args.processes > 1:
        result = run_bench_processes(config, requests, args.concurrency, args.processes)
    if args.processes == 1 or args.exact_queries > 0:
        # Here only when something runs in this process: loading reads every artifact file.
        t0 = time.perf_counter()
        with Retriever(config) as retriever:
            _log(f"loaded the retriever in {time.perf_counter() - t0:.2f}s")
            if args.processes == 1:
                result = run_bench(retriever, requests, args.concurrency)
            if args.exact_queries > 0:
                result.exact = exact_reference(
                    retriever, requests, config.k, max_queries=args.exact_queries
                )
    out = result.to_dict()
    if args.json:
        _print_json(out)
    else:
        print(format_result(out))
    _write_json_out(args, out)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from retrieval.tools.doctor import doctor_sections, format_doctor

    sections = doctor_sections(items=args.items, queries=args.queries)
    if args.json:
        _print_json({key: lines for key, (_title, lines) in sections.items()})
    else:
        print(format_doctor(sections))
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
    if args.json:
        _print_json(dataclasses.asdict(stats))
        return 0
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
    data = report.to_dict()
    if args.json:
        _print_json(data)
    else:
        print(format_report(report))
    _log(f"evaluated in {report.seconds:.1f}s")
    _write_json_out(args, data)
    _write_report(args, lambda t, s: report_data(report, t, s))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from retrieval.serve.server import ServeSettings, serve

    settings = ServeSettings(
        host=args.host,
        port=args.port,
        workers=args.workers,
        graceful_s=args.graceful_s,
        watch_s=args.watch_s,
        max_pending=args.max_pending,
        otel=args.otel,
        access_log=not args.no_access_log,
        json_logs=not args.text_logs,
        log_level=args.log_level,
    )
    return serve(args.config, settings)


def _loadtest(args: argparse.Namespace) -> int:
    from retrieval.serve.loadtest import bodies_from_requests, run_load
    from retrieval.tools.bench import sample_requests

    if args.bodies is not None:
        bodies = [line.encode() for line in args.bodies.read_text().splitlines() if line.strip()]
    else:
        if args.config is None:
            raise InputError("loadtest: pass CONFIG (to sample requests from) or --bodies FILE")
        config = load_config(args.config)
        artifacts = args.artifacts
        if artifacts is None and config.artifacts is not None:
            artifacts = config.resolve_path(config.artifacts)
        if artifacts is None:
            raise InputError("loadtest: pass --artifacts DIR (the config names no artifacts)")
        requests = sample_requests(
            config, artifacts.resolve(), args.events, args.requests, seed=args.seed
        )
        bodies = bodies_from_requests(requests, args.fields)
    if args.save_bodies is not None:
        args.save_bodies.write_bytes(b"".join(b + b"\n" for b in bodies))
        _log(f"wrote {len(bodies)} bodies to {args.save_bodies}")
    url = args.url.rstrip("/")
    if urlsplit(url).path in ("", "/"):
        url += "/v1/blend"
    _log(f"{len(bodies)} request bodies; driving {url} for {args.duration:g} s")
    result = run_load(
        url, bodies, concurrency=args.concurrency, duration_s=args.duration, rate=args.rate
    )
    out = result.to_dict()
    if args.json:
        _print_json(out)
    else:
        print(result.format())
    _write_json_out(args, out)
    return 0 if result.ok else 1


def _write_json_out(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """``--json-out PATH``: the document ``--json`` prints, written to a file as well."""
    if args.json_out:
        args.json_out.write_text(json.dumps(data, indent=2, default=_json_default))
        _log(f"wrote {args.json_out}")


def _write_report(args: argparse.Namespace, report: Callable[[str, str], dict[str, Any]]) -> None:
    """``--report PATH``: the self-contained HTML page of eval and tune."""
    if args.report:
        from retrieval.evaluation.report import ReportData, write_report

        title = f"retrieval {args.command} {args.config.name}"
        command = "retrieval " + " ".join(sys.argv[1:])
        write_report(args.report, cast("ReportData", report(title, command)))
        _log(f"wrote {args.report}")


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
    data = result.to_dict()
    if args.json:
        _print_json(data)
    else:
        _print_trials(result, blend_depths)
    if result.budget_exhausted:
        _log(f"the {args.budget_minutes:g}-minute budget cut the search short")
    _log(f"tuned in {result.seconds / 60:.1f} min; wrote {args.out}")
    _write_json_out(args, data)
    _write_report(args, result.report_data)
    return 0


def _print_trials(result: Any, blend_depths: Callable[[int], Sequence[int]]) -> None:
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
    if args.json:
        _print_json(
            {
                "out": str(out),
                "users": calibration.users,
                "curves": {
                    name: {"edges": list(c.edges), "p": list(c.p)}
                    for name, c in calibration.curves.items()
                },
            }
        )
    else:
        print(f"rank -> hit-rate curves from {calibration.users} hold-out users:")
        for name, curve in calibration.curves.items():
            points = ", ".join(
                f"r{e}:{p:.4f}" for e, p in list(zip(curve.edges, curve.p, strict=True))[:8]
            )
            print(f"  {name:<14} {points} ...")
    _log(f"wrote {out}; use it with blend.strategy: calibrated")
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


DESCRIPTION = """\
The retrieval command line: build, serve-test, evaluate and tune candidate retrieval.

Results go to stdout; progress bars and log lines ("wrote ...", timings) go to stderr.
Every command but serve takes --json: print its result as one JSON document on stdout
instead of the human-readable text (serve has no result; its logs are JSON lines). The
commands that measure (eval, tune, bench, loadtest) also take --json-out PATH, which writes
that document to a file as well.
Run `retrieval COMMAND --help` for a command's arguments and examples.
"""

EPILOG = f"""\
example (a synthetic log, a build, one user's candidates):
  retrieval synth --items 20000 --users 5000 --events 200000 --out data/log.parquet
  retrieval build examples/config.yaml --events data/log.parquet
  retrieval blend examples/config.yaml --user 10000000042 --json

exit codes:
  0    ok
  1    a failure at run time (e.g. a required source failed); with a traceback: a bug
  2    bad input: a config, an events file, an id, an argument (usage errors included)
  3    artifacts missing, made for another config, stale or corrupt: rebuild them
  4    the online store (Redis) failed or holds foreign data
  130  interrupted (Ctrl-C)
  {_BROKEN_PIPE}  the output was closed early (e.g. `retrieval ... | head`); nothing is printed
"""

_JSON_HELP = "print the result as one JSON document on stdout instead of the text ({what})"


def _command(
    sub: Any,
    name: str,
    handler: Handler,
    help: str,
    description: str,
    examples: Sequence[str],
) -> argparse.ArgumentParser:
    """A subcommand with a one-line ``help`` (the top-level listing), a ``description`` (its
    own ``--help``) and an epilog of example invocations, formatted as written."""
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(handler=handler)
    return p


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="the YAML config (e.g. examples/config.yaml)")


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=_JSON_HELP.format(what=what))


def _add_json_out(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--json-out",
        type=Path,
        metavar="PATH",
        help=f"also write the JSON document ({what}) to PATH; the text still goes to stdout",
    )


def _add_sample_log(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--events",
        type=Path,
        default=None,
        metavar="LOG",
        help="log to sample requests from (default: users of the build, without history)",
    )


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--report", type=Path, metavar="PATH", help="also write a self-contained HTML report"
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (also walked by the tests: every argument has help)."""
    from retrieval import __version__

    p = argparse.ArgumentParser(
        prog="retrieval",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"retrieval {__version__}",
        help="print `retrieval VERSION` and exit",
    )
    sub = p.add_subparsers(
        dest="command",
        required=True,
        title="commands",
        metavar="COMMAND",
        help="`retrieval COMMAND --help` shows its arguments and examples",
    )

    v = _command(
        sub,
        "validate",
        _validate,
        help="check a config; print it resolved, or the errors",
        description="Load CONFIG, validate it, and print it resolved (defaults filled in,\n"
        "${VAR} placeholders expanded, passwords in URLs redacted) as YAML, or as JSON with\n"
        "--json. Every error is printed to stderr, each naming its field (exit code 2).",
        examples=[
            "retrieval validate examples/config.yaml",
            "retrieval validate examples/config.yaml --json | jq '.sources[].name'",
        ],
    )
    _add_config(v)
    _add_json(v, "the resolved config")

    b = _command(
        sub,
        "blend",
        _blend,
        help="blend candidates for one user",
        description="Run every source of CONFIG for one user and print the blended candidates\n"
        "(id, score, the sources that found each and at which rank) and each source's report\n"
        "(status, latency, returned and kept). Ids that look like integers are read as int64.",
        examples=[
            "retrieval blend examples/config.yaml --user 10000000042 --history 1000017 1000342",
            "retrieval blend examples/config.yaml --user 10000000042 --context country=DE --json",
        ],
    )
    _add_config(b)
    b.add_argument("--user", required=True, help="the user id (e.g. 10000000042)")
    b.add_argument(
        "--history",
        nargs="*",
        metavar="ID",
        help="recent item ids, oldest first (e.g. --history 1000017 1000342)",
    )
    b.add_argument(
        "--context",
        nargs="*",
        type=_key_value,
        metavar="KEY=VALUE",
        help="segment values as KEY=VALUE (e.g. --context country=DE)",
    )
    b.add_argument(
        "--k",
        type=int,
        metavar="N",
        default=None,
        help="candidates to return (default: the config's k)",
    )
    b.add_argument(
        "--show",
        type=int,
        default=20,
        metavar="N",
        help="candidates to print without --json (default: %(default)s)",
    )
    _add_json(b, "every candidate with its provenance, and every source's report")

    sy = _command(
        sub,
        "synth",
        _synth,
        help="write a realistic synthetic event log",
        description="Write an event log with the structure real logs have (sessions, stable\n"
        "tastes, a long tail that differs by country, releases over time) plus, beside it,\n"
        "<stem>.items.parquet, <stem>.embeddings.npy and <stem>.embedding_ids.npy. The same\n"
        "arguments give the same files. The summary goes to stdout, the progress bar to stderr.",
        examples=[
            "retrieval synth --items 20000 --users 5000 --events 200000 --out data/log.parquet",
            "retrieval synth --items 1000 --users 500 --events 10000 --out log.csv.gz --json",
        ],
    )
    sy.add_argument(
        "--items", type=_positive, metavar="N", required=True, help="catalogue size (e.g. 20000)"
    )
    sy.add_argument(
        "--users", type=_positive, metavar="N", required=True, help="user count (e.g. 5000)"
    )
    sy.add_argument(
        "--events", type=_positive, metavar="N", required=True, help="event count (e.g. 200000)"
    )
    sy.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the event log to write: .parquet, .csv or .csv.gz (the extension picks the format)",
    )
    sy.add_argument(
        "--seed", type=int, metavar="N", default=0, help="random seed (default: %(default)s)"
    )
    _add_json(sy, "the counts and the paths written")

    ev = _command(
        sub,
        "eval",
        _eval,
        help="offline recall per source and for the blend",
        description="Split a log by time (or take a train and a test file), build every source\n"
        "on the train part in memory, and measure each source's and the blend's recall,\n"
        "new-item recall, hit rate, unique hits, coverage and latency at every k on the test\n"
        "part's users.",
        examples=[
            "retrieval eval examples/config.yaml --events data/log.parquet --test-fraction 0.1",
            "retrieval eval tuned.yaml --train train.parquet --test test.parquet "
            "\\\n      --json-out metrics.json --report report.html",
        ],
    )
    _add_config(ev)
    ev.add_argument(
        "--events",
        type=Path,
        metavar="LOG",
        help="CSV or Parquet event log to split (with --split-time or --test-fraction)",
    )
    ev.add_argument(
        "--split-time",
        metavar="T",
        help="the cutoff: events from T on are test (unix seconds or ISO-8601, "
        "e.g. 2024-03-20T00:00:00)",
    )
    ev.add_argument(
        "--test-fraction",
        type=float,
        metavar="F",
        help="the last fraction of the log's time is test (e.g. 0.1)",
    )
    ev.add_argument(
        "--train", type=Path, help="a train log you already split off (with --test, no --events)"
    )
    ev.add_argument("--test", type=Path, help="its test log (with --train)")
    ev.add_argument(
        "--k",
        type=_k_list,
        default=[20, 100, 1000],
        metavar="K[,K...]",
        help="comma-separated cut-offs (default: 20,100,1000)",
    )
    ev.add_argument(
        "--users",
        type=_positive,
        metavar="N",
        default=2000,
        help="test users sampled (default: %(default)s)",
    )
    _add_json(ev, "every metric per source and for the blend")
    _add_json_out(ev, "the metrics")
    _add_report(ev)

    tu = _command(
        sub,
        "tune",
        _tune,
        help="fit every source's parameters and the blend to your log; write a tuned config",
        description="Split LOG by time into a fit part and a validation part, search each\n"
        "learned source's parameters by its validation recall at the config's k, then the\n"
        "blend's, and write the tuned config (a complete YAML file, with what was measured as\n"
        "comments). stdout gets every trial, before -> after recall per source and the blend.",
        examples=[
            "retrieval tune examples/config.yaml --events data/log.parquet --out tuned.yaml",
            "retrieval tune examples/config.yaml --events data/log.parquet --out tuned.yaml "
            "\\\n      --budget-minutes 5 --json-out tune.json --report tune.html",
        ],
    )
    _add_config(tu)
    tu.add_argument(
        "--events", type=Path, required=True, metavar="LOG", help="CSV or Parquet event log"
    )
    tu.add_argument("--out", type=Path, required=True, help="where to write the tuned YAML")
    tu.add_argument(
        "--budget-minutes",
        type=_minutes,
        metavar="MINUTES",
        default=15.0,
        help="stop searching when this is spent; the best found so far is kept "
        "(default: %(default)s)",
    )
    tu.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=0,
        help="picks the validation users and cut points (default: %(default)s)",
    )
    tu.add_argument(
        "--holdout",
        type=float,
        metavar="F",
        default=0.1,
        help="last fraction of the log's time used for validation (default: %(default)s)",
    )
    tu.add_argument(
        "--users",
        type=_positive,
        metavar="N",
        default=2000,
        help="validation users scored (default: %(default)s)",
    )
    _add_json(tu, "every trial, and before and after per source")
    _add_json_out(tu, "every trial")
    _add_report(tu)

    ca = _command(
        sub,
        "calibrate",
        _calibrate,
        help="measure rank -> hit-rate curves for blend.strategy: calibrated",
        description="Hold out the end of LOG, build the sources on the rest, and measure each\n"
        "source's hit rate by rank on the hold-out users; write the curves as JSON (the file\n"
        "blend.strategy: calibrated reads) and print their first points.",
        examples=[
            "retrieval calibrate examples/config.yaml --events data/log.parquet",
            "retrieval calibrate examples/config.yaml --events data/log.parquet "
            "\\\n      --out build/calibration.json --users 500",
        ],
    )
    _add_config(ca)
    ca.add_argument(
        "--events", type=Path, required=True, metavar="LOG", help="CSV or Parquet event log"
    )
    ca.add_argument(
        "--holdout",
        type=float,
        metavar="F",
        default=0.1,
        help="last fraction of the log's time held out (default: %(default)s)",
    )
    ca.add_argument(
        "--users",
        type=_positive,
        metavar="N",
        default=2000,
        help="hold-out users measured (default: %(default)s)",
    )
    ca.add_argument(
        "--k",
        type=_positive,
        metavar="N",
        default=None,
        help="ranks measured per source (default: the config's k)",
    )
    ca.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the curves (default: <artifacts>/calibration.json)",
    )
    _add_json(ca, "every source's curve")

    bd = _command(
        sub,
        "build",
        _build,
        help="build the artifacts of every source that learns",
        description="Read LOG once and build every source of CONFIG that learns from data\n"
        "(co-visitation, item-CF, ANN, popularity, ...) into one directory, published\n"
        "atomically with a manifest of checksums. Prints a row per source.",
        examples=[
            "retrieval build examples/config.yaml --events data/log.parquet",
            "retrieval build examples/config.yaml --events data/log.parquet --out build "
            "\\\n      --only covisit popular",
        ],
    )
    _add_config(bd)
    bd.add_argument(
        "--events", type=Path, required=True, metavar="LOG", help="CSV or Parquet event log"
    )
    bd.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output directory (default: the config's artifacts)",
    )
    bd.add_argument(
        "--only",
        nargs="*",
        metavar="NAME",
        help="build only these sources; every other source of the build already in the output "
        "directory is kept as it was (its files hard-linked into the new build with their "
        "checksums). Refused when this event log gives other id maps (ids/items.npy, "
        "ids/users.npy) than that build: then build every source. Files the manifest does not "
        "list (e.g. calibration.json) are not kept",
    )
    _add_json(bd, "the output directory, counts and every source's row")

    pu = _command(
        sub,
        "push",
        _push,
        help="upload co-visitation and item-CF neighbour lists to Redis",
        description="Upload the neighbour lists of a build to the online store (Redis) as a new\n"
        "version per source, switch readers to it, and delete the version it replaces.",
        examples=[
            "retrieval push examples/config.yaml --artifacts build",
            "retrieval push examples/config.yaml --artifacts build "
            "\\\n      --url redis://cache:6379/0 --only covisit",
        ],
    )
    _add_config(pu)
    pu.add_argument(
        "--artifacts", type=Path, required=True, metavar="DIR", help="the output of `build`"
    )
    pu.add_argument("--url", default=None, help="Redis URL (default: the config's store.url)")
    pu.add_argument("--only", nargs="*", metavar="NAME", help="push only these sources")
    _add_json(pu, "every source pushed: version, rows, bytes, keys deleted")

    be = _command(
        sub,
        "bench",
        _bench,
        help="replay requests against built artifacts; time everything",
        description="Sample requests (from LOG, or users from the build's id map), time\n"
        "blend() on them (p50/p95/p99, blends/s, per source), read the process RSS, and\n"
        "compare the ANN source with exact search (time ratio and recall).",
        examples=[
            "retrieval bench examples/config.yaml --artifacts build --events data/log.parquet",
            "retrieval bench examples/config.yaml --artifacts build --events data/log.parquet "
            "\\\n      --processes 2 --exact-queries 0 --json-out bench.json",
        ],
    )
    _add_config(be)
    be.add_argument(
        "--artifacts", type=Path, required=True, metavar="DIR", help="the output of `build`"
    )
    _add_sample_log(be)
    be.add_argument(
        "--requests",
        type=_positive,
        metavar="N",
        default=2000,
        help="requests replayed (default: %(default)s)",
    )
    be.add_argument(
        "--concurrency",
        type=_positive,
        metavar="N",
        default=1,
        help="threads per process (default: %(default)s)",
    )
    be.add_argument(
        "--processes",
        type=_positive,
        metavar="N",
        default=1,
        help="serving processes sharing the mmapped artifacts; one per core uses every core "
        "(default: %(default)s)",
    )
    be.add_argument(
        "--exact-queries",
        type=int,
        metavar="N",
        default=200,
        help="queries compared with exact search; 0 skips it (default: %(default)s)",
    )
    be.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=0,
        help="picks the sampled requests (default: %(default)s)",
    )
    _add_json(be, "latencies, throughput, RSS, per source, exact search")
    _add_json_out(be, "the figures")

    sv = _command(
        sub,
        "serve",
        _serve,
        help="serve blends over HTTP (workers, metrics, hot reload)",
        description="Serve CONFIG over HTTP: POST /v1/blend, POST /v1/events, GET /healthz,\n"
        "/readyz, /metrics (Prometheus), /v1/info, /openapi.json, POST /admin/reload. Worker\n"
        "processes share the listening socket and the memory-mapped build. SIGHUP, POST\n"
        "/admin/reload or a new build published at the config's artifacts reload the build\n"
        "without failing a request; SIGTERM or Ctrl-C stops after the requests in flight.",
        examples=[
            "retrieval serve examples/config.yaml --port 8000",
            "retrieval serve config.yaml --host 0.0.0.0 --port 8000 --workers 2",
        ],
    )
    _add_config(sv)
    sv.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    sv.add_argument(
        "--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)"
    )
    sv.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="worker processes; one per core uses every core (default: %(default)s)",
    )
    sv.add_argument(
        "--graceful-s",
        type=float,
        default=30.0,
        metavar="S",
        help="longest a stop waits for the requests in flight (default: %(default)s)",
    )
    sv.add_argument(
        "--watch-s",
        type=float,
        default=2.0,
        metavar="S",
        help="how often to check whether artifacts point at a new build; 0: never "
        "(default: %(default)s)",
    )
    sv.add_argument(
        "--max-pending",
        type=_positive,
        default=100,
        metavar="N",
        help="blends waiting in one worker beyond which requests get 503 at once "
        "(default: %(default)s)",
    )
    sv.add_argument("--otel", action="store_true", help="OpenTelemetry spans per blend and source")
    sv.add_argument("--no-access-log", action="store_true", help="no log line per request")
    sv.add_argument("--text-logs", action="store_true", help="plain-text logs instead of JSON")
    sv.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)",
    )

    lt = _command(
        sub,
        "loadtest",
        _loadtest,
        help="drive a running server over HTTP; print latency and throughput",
        description="Send /v1/blend requests sampled from CONFIG's build (or from LOG) to URL at\n"
        "a fixed concurrency, or at a fixed --rate (latency then counts from when each request\n"
        "was due), and print p50/p95/p99, throughput and errors.",
        examples=[
            "retrieval loadtest http://127.0.0.1:8000 examples/config.yaml --duration 20",
            "retrieval loadtest http://127.0.0.1:8000 config.yaml --events log.parquet "
            "--rate 450 --concurrency 32 --json-out load.json",
        ],
    )
    lt.add_argument("url", help="the server (e.g. http://127.0.0.1:8000) or its /v1/blend URL")
    lt.add_argument(
        "config",
        type=Path,
        nargs="?",
        default=None,
        help="the YAML config whose build requests are sampled from (not needed with --bodies)",
    )
    lt.add_argument(
        "--bodies",
        type=Path,
        default=None,
        metavar="FILE",
        help="send these /v1/blend bodies (JSON lines) instead of sampling: e.g. your own "
        "traffic, or a --save-bodies file (sampling a 100M-event log evicts the page cache)",
    )
    lt.add_argument(
        "--save-bodies",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the bodies sent, as JSON lines, for a later --bodies",
    )
    lt.add_argument(
        "--artifacts", type=Path, default=None, metavar="DIR", help="default: the config's"
    )
    _add_sample_log(lt)
    lt.add_argument(
        "--requests",
        type=_positive,
        default=2000,
        metavar="N",
        help="distinct bodies (default: %(default)s)",
    )
    lt.add_argument(
        "--concurrency",
        type=_positive,
        default=8,
        metavar="N",
        help="connections (default: %(default)s)",
    )
    lt.add_argument(
        "--rate", type=float, default=None, metavar="R", help="requests per second (open loop)"
    )
    lt.add_argument(
        "--duration", type=float, default=10.0, metavar="S", help="seconds (default: %(default)s)"
    )
    lt.add_argument(
        "--fields",
        choices=["ids", "full"],
        default="ids",
        help="the response form asked for (default: %(default)s)",
    )
    lt.add_argument("--seed", type=int, default=0, metavar="N", help="picks the sampled requests")
    _add_json(lt, "latencies, throughput, errors")
    _add_json_out(lt, "the figures")

    dr = _command(
        sub,
        "doctor",
        _doctor,
        help="threads, BLAS, versions, CPU flags, GIL release",
        description="Print what this machine gives the retriever: library versions, thread\n"
        "pools (threadpoolctl) and BLAS, CPU flags, and whether annoy and faiss release the\n"
        "GIL during queries (measured on a small random index, not assumed).",
        examples=["retrieval doctor", "retrieval doctor --items 20000 --queries 100 --json"],
    )
    dr.add_argument(
        "--items",
        type=_positive,
        metavar="N",
        default=200_000,
        help="size of the GIL test's index (default: %(default)s)",
    )
    dr.add_argument(
        "--queries",
        type=_positive,
        metavar="N",
        default=400,
        help="queries of the GIL test (default: %(default)s)",
    )
    _add_json(dr, "each section's lines by key: versions, threadpools, blas, cpu, gil")
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
    """Run one command (``argv``: None reads ``sys.argv``) and return its exit code, so a
    script can tell "fix your input" from "rebuild" from "the store" without parsing stderr.

    0 ok; 1 a failure at run time, or a bug (with its traceback, passwords redacted); 2 bad
    input; 3 artifacts to rebuild; 4 the store; 130 interrupted; 141 (128 + SIGPIPE) when the
    reader closed stdout. Errors are printed to stderr, never raised, except that argparse
    itself exits (``SystemExit``: 2 for a usage error, 0 for ``--help``) before any command runs.
    """
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        status = handler(args)
        # A closed pipe must surface here, not in the interpreter's last flush. (A large write
        # the reader cut short can be dropped without an error; the next write then raises.)
        if sys.stdout is not None:
            sys.stdout.flush()
        return status
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
