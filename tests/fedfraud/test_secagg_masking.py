"""Pairwise masking: exact sums, random-looking uploads, and every rule refused by name."""

import os

import numpy as np
import pytest

from conftest import assert_masked

from fedfraud.secagg.masking import (
    MaskReuse, FixedPointOverflow, PairwiseMasker, TooFewParties, WORD_LIMIT, decode, decode_counts,
    encode, encode_counts, unmasked_sum,
)

BANKS = ["bankA", "bankB", "bankC", "bankD"]


def _pair_keys(banks):
    shared = {(a, b): os.urandom(32) for a in banks for b in banks if a < b}
    return {me: {p: shared[min(me, p), max(me, p)] for p in banks if p != me} for me in banks}


def test_masked_counts_sum_exactly_and_each_upload_hides_its_counts():
    keys = _pair_keys(BANKS)
    rng = np.random.default_rng(0)
    counts = {b: rng.integers(0, 50, size=4096) for b in BANKS}
    uploads = [PairwiseMasker(b, keys[b]).mask(encode_counts(counts[b]), label=3) for b in BANKS]
    assert np.array_equal(decode_counts(unmasked_sum(uploads)), sum(counts.values()))
    for upload, bank in zip(uploads, BANKS):
        assert_masked(upload, encode_counts(counts[bank]))  # a plaintext count vector is mostly zero bits


def test_masked_floats_sum_to_fixed_point_precision():
    keys = _pair_keys(BANKS[:3])
    values = {b: np.random.default_rng(i).normal(scale=1e4, size=500) for i, b in enumerate(BANKS[:3])}
    uploads = [PairwiseMasker(b, keys[b]).mask(encode(values[b]), label=0) for b in BANKS[:3]]
    assert np.abs(decode(unmasked_sum(uploads)) - sum(values.values())).max() < 1e-8


def test_a_missing_party_leaves_noise_refused_as_counts_never_a_wrong_sum():
    keys = _pair_keys(BANKS[:3])
    counts = np.ones(64, dtype=np.int64)
    uploads = [PairwiseMasker(b, keys[b]).mask(encode_counts(counts), label=1) for b in BANKS[:2]]
    with pytest.raises(FixedPointOverflow, match="negative"):  # some of 64 random words is >= 2**63
        decode_counts(unmasked_sum(uploads))


def test_rules_are_refused_by_name():
    keys = _pair_keys(BANKS[:2])
    with pytest.raises(TooFewParties, match="too_few_parties"):
        PairwiseMasker("bankA", keys["bankA"])
    masker = PairwiseMasker("bankA", _pair_keys(BANKS[:3])["bankA"])
    masker.mask(encode_counts(np.arange(3)), label=5)
    with pytest.raises(MaskReuse, match="mask_reuse"):
        masker.mask(encode_counts(np.arange(3)), label=5)
    with pytest.raises(FixedPointOverflow, match="fixed_point_overflow"):
        encode(np.array([WORD_LIMIT / 2**32]))
    with pytest.raises(FixedPointOverflow, match="NaN or infinite"):
        encode(np.array([np.nan]))
    with pytest.raises(FixedPointOverflow, match="0.."):
        encode_counts(np.array([-1]))
