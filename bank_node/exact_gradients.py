"""The histogram strategy's objective: the weighted logistic loss with gradients on the masking's grid.

Why: a masked histogram round sums each bank's gradient and hessian histograms as fixed-point words
(steps of 2**-FRAC_BITS, ``fedfraud.secagg.masking``). XGBoost's own logistic gradients are float32
values whose low bits lie far below that step (a non-fraud row at p = 0.002 has bits down to ~2**-33,
smaller p lower still), so the masked sums were rounded where plaintext float64 sums were not, and
on 4 banks x 100,000 rows a near-tie flipped a split in round 3: masked and unmasked models differed.

Here every row's gradient and hessian is rounded to a multiple of 2**-FRAC_BITS that is also exact in
float32 (XGBoost stores them as float32). Then every sum is exact, so the order of summing does not
matter: each bank's histogram, its fixed-point words, the server's sum of the words and a centralized
fit's histogram over the pooled rows are the same numbers, and the masked model, the unmasked model and
the centralized fit on the shared bins (``aggregator.drivers.baselines.run_centralized``) are
bit-identical by construction, at any size, while every summed value stays below 2**(53 - FRAC_BITS)
in magnitude (2**21: float64 holds every multiple of the step below it; the sums of a fraud
consortium with the default ``sqrt`` imbalance stay far below; beyond it float64 itself rounds, and
the sidecar counts such sums in its log).

The loss is XGBoost's ``binary:logistic`` with ``scale_pos_weight``: g = w (p - y), h = w p (1 - p),
w = scale_pos_weight for a fraud row, computed in float64 from the float32 margin, then rounded (ties
to even). A hessian is never below one step (XGBoost's own floor is 1e-16), so no row's weight is lost.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedfraud.secagg.masking import FRAC_BITS


def on_grid(values: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """``values`` rounded to multiples of 2**-frac_bits, then to float32, so the result is exact in both: below
    2**(24 - frac_bits) a multiple of the step has at most 24 significant bits; above, float32's spacing is
    itself a multiple of the step (for frac_bits <= 32)."""
    stepped = np.ldexp(np.rint(np.ldexp(np.asarray(values, dtype=np.float64), frac_bits)), -frac_bits)
    return stepped.astype(np.float32)


def logistic_gradients(margin: np.ndarray, y: np.ndarray, scale_pos_weight: float,
                       frac_bits: int = FRAC_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Each row's weighted logistic (gradient, hessian) on the 2**-frac_bits grid, as float32."""
    p = 1.0 / (1.0 + np.exp(-np.asarray(margin, dtype=np.float64)))
    weight = np.where(np.asarray(y) > 0, float(scale_pos_weight), 1.0)
    gradient = on_grid(weight * (p - y), frac_bits)
    hessian = np.maximum(on_grid(weight * p * (1.0 - p), frac_bits), np.float32(2.0 ** -frac_bits))
    return gradient, hessian


def fixed_point_logistic(params: dict[str, Any], frac_bits: int = FRAC_BITS):
    """The custom objective ``xgb.train(obj=...)`` takes: the model's JSON still says ``binary:logistic``."""
    weight = float(params.get("scale_pos_weight", 1.0))

    def objective(margin: np.ndarray, dtrain) -> tuple[np.ndarray, np.ndarray]:
        return logistic_gradients(margin, dtrain.get_label(), weight, frac_bits)

    return objective
