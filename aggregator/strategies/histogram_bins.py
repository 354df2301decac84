"""The histogram strategy's shared bins from masked grid counts: the aggregator learns the pooled counts only.

Before the first round (``Histogram.shared_bins``), for attempt a = 1, 2, ...:

* a key session named ``grid:<federation>:r<round>:a<attempt>:<nonce>`` (never reused); every bank of the
  attempt is asked for a signed ephemeral key offer (``KeyRequest``, answered by ``node.offer``);
* the well-formed offers go, unchanged, into one ``GridCountTask`` (session, offering banks, offers, the
  public dense layout) that each offering bank answers with its dense grid counts as pairwise-masked words;
* the wrapping sum of every answer, decoded, is the pooled counts; they are used only when every offering
  bank answered well-formed words and every feature counts the same rows. ``Grid.min_count`` applies to
  the pooled counts; then ``binning.derive_edges`` as before.

Fewer than three banks (``MIN_PARTIES``) offering or left fail by name (``too_few_parties``). A bank that
offered but did not answer: a new attempt with the banks that answered, under a new session and fresh keys,
at most ``MAX_ATTEMPTS``; else ``grid_counts_incomplete`` by name. A sum that is not counts fails by name
(``grid_sum_invalid``). Never a wrong sum. Banks left out are returned, named, for the round's rejections.
"""

from __future__ import annotations

import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from aggregator.protocol.errors import RoundFailed
from fedfraud.binning import BinCounts, GlobalBins, Grid, derive_edges
from fedfraud.grid_counts import GridCountTask, GridLayout, MaskedGridCounts
from fedfraud.secagg.masking import MIN_PARTIES, SecureAggregationError, decode_counts, unmasked_sum
from fedfraud.wire import KeyRequest, SessionOffer, WireFormatError

MAX_ATTEMPTS = 3
log = logging.getLogger("fedfraud.histogram")


def _ask_all(nodes: dict[str, Any], banks: list[str], call: Callable[[Any], bytes]) -> dict[str, bytes | Exception]:
    """Every bank's answer (or its exception), the banks asked in parallel (a networked bank answers a task)."""
    with ThreadPoolExecutor(max_workers=max(1, len(banks)), thread_name_prefix="grid-counts") as pool:
        futures = {bank: pool.submit(call, nodes[bank]) for bank in banks}
    return {bank: (f.exception() or f.result()) for bank, f in futures.items()}


def _fault(bank: str, check: str, detail: object) -> dict[str, str]:
    return {"bank": bank, "check": check, "detail": str(detail)[:300]}


def _offers(nodes, banks: list[str], session: str) -> tuple[dict[str, dict], list[dict[str, str]]]:
    request = KeyRequest(session, sorted(banks)).to_bytes()
    offers, faults = {}, []
    for bank, answer in _ask_all(nodes, banks, lambda node: node.offer(request)).items():
        try:
            if isinstance(answer, Exception):
                raise answer
            offers[bank] = SessionOffer.relayable(answer, bank, session)
        except Exception as exc:
            faults.append(_fault(bank, "grid_key_offer_missing", f"{exc.__class__.__name__}: {exc}"))
    return offers, faults


def _uploads(nodes, task: GridCountTask, layout: GridLayout, features: int | None
             ) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    body = task.to_bytes()
    uploads, faults = {}, []
    for bank, answer in _ask_all(nodes, task.banks, lambda node: node.bin_counts(body)).items():
        try:
            if isinstance(answer, Exception):
                raise answer
            counts = MaskedGridCounts.from_bytes(answer)
            if counts.bank != bank or counts.session != task.session:
                raise WireFormatError(f"answer names {counts.bank[:40]} / session {counts.session[:80]}")
            words = counts.word_array(layout.words_per_feature)
            if features is not None and len(words) != layout.words(features):
                raise WireFormatError(f"{len(words)} words, expected {layout.words(features)} ({features} features)")
            uploads[bank] = words
        except Exception as exc:
            faults.append(_fault(bank, "masked_grid_counts_missing", f"{exc.__class__.__name__}: {exc}"))
    lengths = {len(w) for w in uploads.values()}
    if len(lengths) > 1:  # without a header, the most common length is the contract's
        common = max(lengths, key=lambda n: sum(len(w) == n for w in uploads.values()))
        for bank in [b for b, w in uploads.items() if len(w) != common]:
            detail = f"{len(uploads.pop(bank))} words, the others {common}"
            faults.append(_fault(bank, "masked_grid_counts_missing", detail))
    return uploads, faults


def masked_shared_bins(nodes: dict[str, Any], banks: list[str], layout: GridLayout, min_count: int, max_bin: int,
                       federation: str, round_id: int, features: int | None = None
                       ) -> tuple[GlobalBins, list[str], list[dict[str, str]]]:
    """(the shared bins, the banks whose counts they pool, every bank left out on the way, named)."""
    current, faults = sorted(banks), []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        if len(current) < MIN_PARTIES:
            break
        session = f"grid:{federation}:r{round_id}:a{attempt}:{secrets.token_hex(8)}"
        offers, offer_faults = _offers(nodes, current, session)
        faults += offer_faults
        if len(offers) < MIN_PARTIES:
            raise RoundFailed(f"round {round_id}: too_few_parties: {len(offers)} grid key offer(s) of {len(current)} "
                              f"banks, masked grid counts need {MIN_PARTIES}; faults: {faults}")
        task = GridCountTask(session, sorted(offers), offers, layout.to_dict())
        uploads, upload_faults = _uploads(nodes, task, layout, features)
        faults += upload_faults
        if sorted(uploads) == task.banks:
            return _decoded(uploads, task.banks, layout, min_count, max_bin, round_id), task.banks, faults
        current = sorted(uploads)
        log.warning("round %s: grid counts attempt %s: %s did not answer; %s", round_id, attempt,
                    sorted(set(task.banks) - set(uploads)),
                    f"attempt {attempt + 1} with {current} under fresh keys" if attempt < MAX_ATTEMPTS else "giving up")
    if len(current) < MIN_PARTIES:
        raise RoundFailed(f"round {round_id}: too_few_parties: {len(current)} bank(s) left for masked grid counts, "
                          f"{MIN_PARTIES} needed; faults: {faults}")
    raise RoundFailed(f"round {round_id}: grid_counts_incomplete: a bank dropped in each of {MAX_ATTEMPTS} attempts; "
                      f"faults: {faults}")


def _decoded(uploads: dict[str, np.ndarray], banks: list[str], layout: GridLayout, min_count: int, max_bin: int,
             round_id: int) -> GlobalBins:
    try:
        pooled = decode_counts(unmasked_sum([uploads[b] for b in banks]))
        cells = layout.pooled_cells(pooled.reshape(-1, layout.words_per_feature), min_count)
    except (SecureAggregationError, ValueError) as exc:
        raise RoundFailed(f"round {round_id}: grid_sum_invalid: the grid counts of {banks} do not sum to counts "
                          f"({exc}); no bins derived") from None
    edges = tuple(derive_edges(c, n, max_bin, layout.mantissa_bits) for c, n in cells)
    return GlobalBins(edges, max_bin, layout.mantissa_bits)


def clear_shared_bins(nodes: dict[str, Any], banks: list[str], grid: Grid, max_bin: int) -> GlobalBins:
    """Unmasked sessions only (benches; banks refuse unless they allow them): sparse counts in the clear."""
    reports = []
    for bank in banks:
        try:
            report = BinCounts.from_bytes(nodes[bank].bin_counts(grid.to_bytes()))
        except Exception as exc:
            raise RoundFailed(f"{bank} sent no usable bin counts: {exc.__class__.__name__}: {exc}") from exc
        if report.bank != bank:
            raise RoundFailed(f"bin counts from {bank} claim to be from {report.bank}")
        reports.append(report)
    return GlobalBins.from_counts(reports, max_bin)
