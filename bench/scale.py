"""Bench: scale. Many banks, one large bank, and scoring with the champion (issue 14, item 3).

Parts (``--parts``, comma-separated; every case runs in a fresh Python process, so each one's
peak memory is its own; a case whose JSON exists is reused unless ``--force``):

* ``banks``: ``--bank-counts`` (5,10,20,50) banks x ``--rows-per-bank`` (20,000) rows, each of
  ``--strategies`` (bagging, cyclic, histogram; masking on, as deployed) for ``--rounds`` x
  ``--trees`` trees, every other setting default (cross-evaluation, acceptance, champion gate).
  Per case: wall time of the federation, of the cross-evaluation before round 1 and of each round
  (its training stages apart), peak RSS of the process (aggregator and every bank's node: the
  embedded driver runs them in one process) above the RSS with all banks' data loaded, peak RSS
  summed over child processes (histogram workers and masking sidecars), and bytes per bank per
  direction as the rounds counted them. See ``scale_banks.py``.
* ``bank``: one bank of each ``--sizes`` rows through gate + features (Spark) and training; rows/s
  and peak RSS of Spark's driver JVM and of the Python process. See ``scale_bank.py``.
* ``scoring``: ``fedfraud score``'s path with the champion of the ``--score-model`` case
  (default the bagging case with the fewest banks) on ``--score-rows`` rows of one bank.

    nice -n 19 .venv/bin/python bench/scale.py --parts banks --bank-counts 5,10,20,50
    nice -n 19 .venv/bin/python bench/scale.py --parts banks --bank-counts 5,50 --strategies cyclic \
        --option acceptance_evaluators=10        # cases named cyclic-50+acceptance_evaluators=10
    nice -n 19 .venv/bin/python bench/scale.py --parts bank --sizes 1000000
    nice -n 19 .venv/bin/python bench/scale.py --parts scoring --score-rows 1000000

Results: ``<work-dir>/{banks,bank,scoring}/*.json`` and ``<work-dir>/summary.json``; tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from scale_tables import print_bank, print_banks, print_scoring

STRATEGIES = ("bagging", "cyclic", "histogram")


def csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=csv(str), default=["banks", "scoring", "bank"])
    parser.add_argument("--work-dir", type=Path, default=Path("work/bench/scale"))
    parser.add_argument("--bank-counts", type=csv(int), default=[5, 10, 20, 50])
    parser.add_argument("--strategies", type=csv(str), default=list(STRATEGIES))
    parser.add_argument("--rows-per-bank", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--trees", type=int, default=10, help="trees per round (and of the large bank's model)")
    parser.add_argument("--sizes", type=csv(int), default=[1_000_000, 10_000_000], help="rows of the large bank")
    parser.add_argument("--score-rows", type=int, default=1_000_000)
    parser.add_argument("--score-model", default=None, help="case whose champion scores, e.g. bagging-5")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--stop-at", default=None, help="HH:MM (UTC): start no case after this time")
    parser.add_argument("--force", action="store_true", help="re-run cases whose JSON exists")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=JSON",
                        help="banks part: a federation option (fedfraud.settings.REQUEST_OPTIONS), e.g. "
                             "acceptance_evaluators=10; the cases are named with it")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case, this process
    args = parser.parse_args(argv)
    unknown = set(args.strategies) - set(STRATEGIES)
    if unknown or not set(args.parts) <= {"banks", "bank", "scoring"}:
        parser.error(f"unknown strategies {sorted(unknown)} or parts {args.parts}")
    return args


def run_case(args: argparse.Namespace) -> None:
    """Internal: one case in this process; its JSON goes to the path the parent chose."""
    case = json.loads(args.case)
    kind, out = case.pop("kind"), Path(case.pop("out"))
    if kind == "banks":
        from scale_banks import run_case as run
    elif kind == "prepare":
        from scale_banks import prepare as run
    elif kind == "bank":
        from scale_bank import run_bank as run
    else:
        from scale_bank import run_scoring as run
    result = run(args.work_dir, **case)
    from pipelines.io import write_bytes

    write_bytes(json.dumps({**result, "finished": datetime.now(UTC).isoformat(timespec="seconds")}, indent=2).encode(),
                out)


def too_late(args: argparse.Namespace) -> bool:
    if not args.stop_at:
        return False
    now = datetime.now(UTC).strftime("%H:%M")
    return now >= args.stop_at


def launch(args: argparse.Namespace, out: Path, kind: str, **case) -> dict:
    """Run one case in a child process; its JSON, or a record of why it failed (also written to ``out``)."""
    if out.exists() and not args.force:
        return json.loads(out.read_text())
    if too_late(args):
        return {"skipped": f"--stop-at {args.stop_at} passed", **case}
    command = [sys.executable, str(Path(__file__).resolve()), "--work-dir", str(args.work_dir), "--seed",
               str(args.seed), "--case", json.dumps({"kind": kind, "out": str(out), **case})]
    print(f"  [{time.strftime('%H:%M:%S')}] {kind} {case} ...", file=sys.stderr, flush=True)
    began = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = out.with_suffix(".log")  # the case's stderr (tail -f it)
    with open(progress, "w") as handle:
        code = subprocess.run(command, stderr=handle).returncode
    if code == 0 and out.exists():
        return json.loads(out.read_text())
    failed = {"failed": f"exit {code} after {time.perf_counter() - began:.0f}s",
              "stderr_tail": progress.read_text(errors="replace")[-3000:], **case}
    if kind != "prepare":
        out.write_text(json.dumps(failed, indent=2))
    return failed


def banks_part(args: argparse.Namespace) -> list[dict]:
    common = {"rows": args.rows_per_bank}
    options = federation_options(args.option)  # refused before any work
    prepared = launch(args, args.work_dir / "banks" / f"prepare-{max(args.bank_counts)}.json", "prepare",
                      n_banks=max(args.bank_counts), seed=args.seed, **common)
    if "failed" in prepared:
        raise SystemExit(f"preparing the banks failed: {prepared['stderr_tail']}")
    suffix = "".join(f"+{k}={json.dumps(v)}" for k, v in sorted(options.items()))
    results = []
    for n in sorted(args.bank_counts):
        for strategy in args.strategies:
            results.append(launch(args, args.work_dir / "banks" / f"{strategy}-{n}{suffix}.json", "banks",
                                  strategy=strategy, n_banks=n, rounds=args.rounds, trees=args.trees, seed=args.seed,
                                  options=options, case_name=f"{strategy}-{n}{suffix}", **common))
    return results


def federation_options(pairs: list[str]) -> dict:
    """``NAME=JSON`` pairs as federation options, checked as a federation request's are."""
    from fedfraud.settings import requested_settings

    options = {}
    try:
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"{pair!r} is not NAME=JSON, e.g. acceptance_evaluators=10")
            try:
                options[name] = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(f"{name}: {value!r} is not a JSON value") from None
        requested_settings(1, 1, options)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"--option: {exc}") from exc
    return options


def scoring_part(args: argparse.Namespace) -> dict:
    case = args.score_model or f"bagging-{min(args.bank_counts)}"
    strategy, n = case.rsplit("-", 1)
    uri = f"sqlite:///{(args.work_dir / 'cases' / case / 'mlflow.db').resolve()}"
    if not (args.work_dir / "banks" / f"{case}.json").exists():
        raise SystemExit(f"no model to score with: run --parts banks for {case} first")
    return launch(args, args.work_dir / "scoring" / f"{case}-{args.score_rows}.json", "scoring",
                  rows=args.score_rows, tracking_uri=uri, model_name=f"scale-{strategy}-{n}", seed=args.seed)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        return run_case(args)
    summary: dict = {"command": " ".join(["bench/scale.py", *(argv or sys.argv[1:])]),
                     "started": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
                     "load_average_start": os.getloadavg()}
    if "banks" in args.parts:
        summary["banks"] = banks_part(args)
        print_banks(summary["banks"])
    if "bank" in args.parts:  # before scoring: scoring times the model alone on these features too
        summary["bank"] = [launch(args, args.work_dir / "bank" / f"{rows}.json", "bank", rows=rows, trees=args.trees,
                                  seed=args.seed) for rows in args.sizes]
        print_bank(summary["bank"])
    if "scoring" in args.parts:
        summary["scoring"] = scoring_part(args)
        print_scoring(summary["scoring"])
    summary["load_average_end"] = os.getloadavg()
    out = args.work_dir / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nresults: {out} (and {args.work_dir}/<part>/*.json)")


if __name__ == "__main__":
    main()
