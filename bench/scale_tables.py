"""Markdown tables of the scale bench's results (``bench/scale.py``)."""

from __future__ import annotations

MB = 1e6


def _failed(row: dict) -> str | None:
    return row.get("failed") or row.get("skipped")


def label(row: dict) -> str:
    """The case's strategy and the federation options it ran with (``--option``)."""
    options = row.get("options") or {}
    return row.get("strategy", "?") + "".join(f" {k}={v}" for k, v in sorted(options.items()))


def as_deployed(row: dict) -> float:
    """A round as deployed (a machine per bank): the aggregator's own time plus the busiest bank's, per round."""
    detail = row["rounds_detail"]
    return sum(x["aggregator_seconds"] + x["busiest_bank_seconds"] for x in detail) / len(detail)


def growth(rows: list[dict], key) -> dict[str, dict[int, float]]:
    """{case label: {banks: key(row) / key(row at the fewest banks)}} over the cases that ran."""
    out: dict[str, dict[int, float]] = {}
    for strategy in sorted({label(r) for r in rows if not _failed(r)}):
        ran = sorted((r for r in rows if label(r) == strategy and not _failed(r)), key=lambda r: r["banks"])
        base = key(ran[0])
        out[strategy] = {r["banks"]: key(r) / base for r in ran}
    return out


def print_banks(rows: list[dict]) -> None:
    print("\nBank sweep (one case per process; times in s, memory in MiB, traffic in MB per bank per round, "
          "mean over banks (max)):")
    print("| strategy | banks | federation | crossval | round | of which training | busiest bank | process peak RSS | "
          "above banks loaded | children peak RSS (n) | bank sent | bank received | pooled AUPRC | model id |")
    print("|---" * 14 + "|")
    for r in sorted(rows, key=lambda r: (r.get("strategy", ""), r.get("banks", r.get("n_banks", 0)))):
        if _failed(r):
            print(f"| {r.get('strategy')} | {r.get('n_banks')} | did not run: {_failed(r)} |" + " |" * 11)
            continue
        m, rounds = r["memory"], r["rounds"]
        training = sum(x["training_seconds"] for x in r["rounds_detail"]) / len(r["rounds_detail"])
        busiest = [x.get("busiest_bank_seconds") for x in r["rounds_detail"]]
        busiest_cell = f"{sum(busiest) / len(busiest):.1f}" if None not in busiest else "-"
        ways = {w: [b[w] / rounds / MB for b in r["wire_bytes"].values()] for w in ("sent", "received")}
        cells = {w: f"{sum(v) / len(v):.3f} ({max(v):.3f})" if v else "-" for w, v in ways.items()}
        print(f"| {label(r)} | {r['banks']} | {r['federation_seconds']:.1f} | {r['crossval_seconds'] or 0:.1f} | "
              f"{r['round_seconds_mean']:.1f} | {training:.1f} | {busiest_cell} | {m['process_peak_rss_mib']:.0f} | "
              f"{m['federation_increment_mib']:.0f} | {m['children_peak_rss_mib']:.0f} ({m['children_peak_count']}) | "
              f"{cells['sent']} | {cells['received']} | {r['pooled_auprc']:.3f} | {r.get('model_id') or '-'} |")
    ran = [r for r in rows if not _failed(r)]
    if not ran:
        return
    print("\nGrowth from the fewest banks (x; linear growth = the banks' ratio):")
    for name, key in (("round", lambda r: r["round_seconds_mean"]),
                      ("round as deployed", as_deployed),  # the aggregator's own time + the busiest bank's
                      ("federation", lambda r: r["federation_seconds"]),
                      ("memory above banks loaded", lambda r: max(r["memory"]["federation_increment_mib"], 1.0)),
                      ("bytes a bank received", lambda r: sum(b["received"] for b in r["wire_bytes"].values())
                       / len(r["wire_bytes"]))):  # the mean over banks
        for strategy, ratios in growth(ran, key).items():
            base = min(ratios)
            verdict = all(ratio <= 1.1 * n / base for n, ratio in ratios.items())
            print(f"  {name:<26} {strategy:<9} " + ", ".join(f"{n} banks {v:.2f}x (linear {n / base:.1f}x)"
                                                              for n, v in ratios.items())
                  + f": {'no worse than linear' if verdict else 'WORSE than linear'}")


def print_scoring(row: dict) -> None:
    if _failed(row):
        print(f"\nScoring did not run: {_failed(row)}")
        return
    e = row["end_to_end"]
    print(f"\nScoring with {row['model_uri']} ({row['rows']:,} rows; {row['scored']:,} scored, "
          f"{row['quarantined']:,} quarantined):")
    print(f"  end to end (gate + features + model, fedfraud score): {e['seconds']:.1f}s = {e['rows_per_s']:,} rows/s; "
          f"driver JVM peak RSS {e['children_peak_hwm_mib_by_command'].get('java', 0):.0f} MiB")
    if "model_only" in row:
        m = row["model_only"]
        print(f"  model alone ({m['trees']} trees, Booster.predict on built features): {m['seconds']:.2f}s = "
              f"{m['rows_per_s']:,} rows/s")


def print_bank(rows: list[dict]) -> None:
    print("\nOne bank (gate + features in Spark, then training in Python):")
    print("| rows | gate + features s | rows/s | driver JVM peak RSS MiB | training s | train rows/s | "
          "Python peak RSS MiB |")
    print("|---" * 7 + "|")
    ran = []
    for r in rows:
        if _failed(r):
            print(f"| {r.get('rows'):,} | did not run: {_failed(r)} |" + " |" * 5)
            continue
        ran.append(r)
        g, t = r["steps"]["gate_features"], r["steps"]["training"]
        print(f"| {r['rows']:,} | {g['seconds']:.0f} | {g['rows_per_s']:,} | {r['driver_jvm_peak_rss_mib'] or 0:.0f} | "
              f"{t['seconds']:.1f} | {t['rows_per_s']:,} | {r['python_peak_rss_mib']:.0f} |")
    if len(ran) > 1:
        base = ran[0]
        for r in ran[1:]:
            ratio = (r["driver_jvm_peak_rss_mib"] or 0) / max(base["driver_jvm_peak_rss_mib"] or 1, 1)
            print(f"  driver JVM peak RSS at {r['rows']:,} rows = {ratio:.2f}x the {base['rows']:,}-row figure "
                  f"(target <= 1.5x): {'met' if ratio <= 1.5 else 'NOT met'}")
