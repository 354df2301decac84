"""Bench: the histogram strategy's shared bins from masked grid counts against the clear (sparse) path.

On prepared banks (folders holding ``feature_contract.json`` and ``features/``, as ``prepare_consortium`` and
``bench/federation.py`` write them under ``<work-dir>/banks/``), it prints:

1. the dense layout's size for the contract (words per feature, words and bytes per bank's upload);
2. wall time of ``Histogram.shared_bins`` masked (key offers, counting, masking, decoding: every bank in
   process, as the embedded driver runs them) and in the clear (``FEDFRAUD_HISTOGRAM_SECAGG=0`` with
   ``FEDFRAUD_SECAGG_ALLOW_UNMASKED=1``), median of ``--repeats``, alternating;
3. whether the edges are the same, and per feature the rows in the layout's clipped zones (values beyond
   ``2**(exponent_max + 1)`` or nonzero below ``2**exponent_min``).

    .venv/bin/python bench/grid_counts.py --work-dir work/bench/fed300
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.drivers.embedded import embedded_credentials  # noqa: E402
from aggregator.strategies.histogram import Histogram  # noqa: E402
from bank_node.masked_grid import ALLOW_UNMASKED_ENV  # noqa: E402
from bank_node.node import BankNode  # noqa: E402
from fedfraud.binning import Grid  # noqa: E402
from fedfraud.grid_counts import GridLayout  # noqa: E402
from fedfraud.settings import FederationSettings, consortium_params  # noqa: E402


def clipped_rows(layout: GridLayout, X: np.ndarray) -> np.ndarray:
    """Per feature, the rows whose value the layout counts in a clipped zone."""
    magnitude = np.abs(X.astype(np.float64))
    big = magnitude >= 2.0 ** (layout.exponent_max + 1)
    small = (magnitude > 0) & (magnitude < 2.0 ** layout.exponent_min) & (magnitude >= 2.0 ** -(126 + 7))
    return (big | small).sum(axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, required=True, help="holds banks/<bank>/ prepared")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-bin", type=int, default=256)
    args = parser.parse_args()

    folders = sorted(p for p in (args.work_dir / "banks").iterdir() if (p / "feature_contract.json").exists())
    nodes = {p.name: BankNode(p.name, p, p, config=None) for p in folders}
    pki = Path(tempfile.mkdtemp(prefix="grid-bench-pki-"))
    for bank, credentials in embedded_credentials(pki, sorted(nodes)).items():
        nodes[bank].secagg = credentials
    banks = sorted(nodes)
    rows = {b: len(nodes[b].data.X_train) for b in banks}
    features = nodes[banks[0]].data.X_train.shape[1]
    settings = FederationSettings(max_bin=args.max_bin)
    layout = Histogram.grid_layout
    print(f"banks {banks}, training rows {rows}, {features} features; layout {layout.to_dict()}: "
          f"{layout.words_per_feature} words per feature, {layout.words(features)} words "
          f"({8 * layout.words(features) / 1e6:.2f} MB) per bank's upload")

    os.environ[ALLOW_UNMASKED_ENV] = "1"  # for the clear path's comparison only
    times: dict[str, list[float]] = {"masked": [], "clear": []}
    digests: dict[str, set[str]] = {"masked": set(), "clear": set()}
    sizes: dict[str, int] = {}
    for repeat in range(args.repeats):
        for mode in (["masked", "clear"] if repeat % 2 == 0 else ["clear", "masked"]):
            strategy = Histogram(settings, 3, consortium_params(settings, 1, 100))
            strategy.secagg = mode == "masked"
            started = time.perf_counter()
            bins = strategy.shared_bins(nodes, banks)
            times[mode].append(time.perf_counter() - started)
            digests[mode].add(bins.digest)
            edges = bins.edges
    for bank in banks[:1]:
        sizes["clear"] = len(nodes[bank].bin_counts(Grid().to_bytes()))
        answers = sorted((nodes[bank].work_dir / "secagg").rglob("grid.json"), key=lambda p: p.stat().st_mtime)
        sizes["masked"] = answers[-1].stat().st_size if answers else -1
    print(f"shared_bins, median of {args.repeats}: masked {statistics.median(times['masked']):.2f}s, clear "
          f"{statistics.median(times['clear']):.2f}s; {banks[0]}'s upload: masked ~{sizes['masked'] / 1e6:.2f} MB "
          f"(as kept, JSON), clear {sizes['clear'] / 1e6:.2f} MB")
    same = digests["masked"] == digests["clear"] and len(digests["masked"]) == 1
    print(f"edges: masked {sorted(digests['masked'])}, clear {sorted(digests['clear'])}: "
          f"{'the same' if same else 'DIFFERENT'}; bins per feature {[len(e) + 1 for e in edges]}")
    pooled = np.concatenate([nodes[b].data.X_train for b in banks])
    clipped = clipped_rows(layout, pooled)
    names = nodes[banks[0]].contract["names"]
    print("rows in clipped zones: " + (", ".join(f"{names[f]} {int(n)}" for f, n in enumerate(clipped) if n)
                                      or "none"))
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
