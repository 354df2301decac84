"""The histogram strategy's fixed-point logistic gradients: exact sums in any order, close to XGBoost's own."""

from __future__ import annotations

import numpy as np
import xgboost as xgb

from bank_node.exact_gradients import fixed_point_logistic, logistic_gradients, on_grid
from fedfraud.secagg.masking import FRAC_BITS, decode, encode, unmasked_sum

RNG = np.random.default_rng(11)
MARGIN = np.concatenate([RNG.normal(-6.0, 2.5, 20_000), RNG.normal(3.0, 4.0, 200), [-40.0, 40.0, 0.0]])
Y = np.concatenate([np.zeros(20_000), np.ones(200), [0.0, 1.0, 1.0]]).astype(np.float32)


def is_on_grid(values: np.ndarray) -> bool:
    scaled = np.ldexp(values.astype(np.float64), FRAC_BITS)
    return bool(np.all(scaled == np.rint(scaled)))


def xgboost_like(margin, y, weight):
    """XGBoost's own logistic gradients: float32, off the grid."""
    p = (1.0 / (1.0 + np.exp(-margin.astype(np.float32)))).astype(np.float32)
    w = np.where(y > 0, weight, 1.0).astype(np.float32)
    return (w * (p - y)).astype(np.float32), (w * p * (1 - p)).astype(np.float32)


def test_every_gradient_is_on_the_grid_and_exact_in_float32():
    g, h = logistic_gradients(MARGIN, Y, scale_pos_weight=22.4)
    assert g.dtype == h.dtype == np.float32
    assert is_on_grid(g) and is_on_grid(h)
    assert np.all(h >= 2.0 ** -FRAC_BITS)  # a hessian is never zero
    assert not is_on_grid(xgboost_like(MARGIN, Y, 22.4)[0])  # what XGBoost itself computes is not
    wide = np.array([1e-12, 3.3e-3, 0.7, -1.9, 513.25, -7e4])
    assert is_on_grid(on_grid(wide)) and np.array_equal(on_grid(wide).astype(np.float32), on_grid(wide))


def test_sums_are_the_same_in_any_order_and_through_the_fixed_point_words():
    """The property the masked histogram rests on: per-bank float64 sums, encoded, summed and decoded, equal the
    pooled float64 sum in any order. XGBoost's own float32 gradients fail it (the round-3 split flip)."""
    def through_words(values: np.ndarray) -> tuple[float, float]:
        parts = np.array_split(values.astype(np.float64), 4)  # four banks' histogram bins
        words = decode(unmasked_sum([encode(np.array([p.sum()])) for p in parts]))[0]
        return float(words), float(np.sum(values.astype(np.float64)[RNG.permutation(values.size)]))

    for weight in (1.0, 22.4, 500.0):
        for column in logistic_gradients(MARGIN, Y, weight):
            masked, pooled = through_words(column)
            assert masked == pooled == float(np.sum(column.astype(np.float64)))
    g, h = xgboost_like(MARGIN, Y, 22.4)
    assert any(np.subtract(*through_words(c)) != 0 for c in (g, h))


def test_the_gradients_are_xgboosts_logistic_loss_within_one_step():
    g, h = logistic_gradients(MARGIN, Y, scale_pos_weight=22.4)
    reference_g, reference_h = xgboost_like(MARGIN, Y, 22.4)
    tolerance = 2.0 ** -FRAC_BITS + 22.4 * 2.0 ** -23  # the step, and float32's rounding of p
    assert np.max(np.abs(g - reference_g)) <= tolerance and np.max(np.abs(h - reference_h)) <= tolerance


def test_a_model_trained_with_it_is_binary_logistic_and_close_to_the_builtin_objective():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(4_000, 5)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=4_000) > 2.2).astype(np.float32)
    params = {"objective": "binary:logistic", "tree_method": "hist", "max_depth": 3, "eta": 0.3, "nthread": 1,
              "scale_pos_weight": 4.0, "base_score": 0.05, "seed": 1}
    matrix = xgb.DMatrix(X, label=y)
    ours = xgb.train(params, matrix, num_boost_round=10, obj=fixed_point_logistic(params))
    builtin = xgb.train(params, matrix, num_boost_round=10)
    assert '"binary:logistic"' in ours.save_raw("json").decode()
    assert np.allclose(ours.predict(matrix), builtin.predict(matrix), atol=1e-5)
    again = xgb.train(params, matrix, num_boost_round=10, obj=fixed_point_logistic(params))
    assert ours.save_raw("json") == again.save_raw("json")
