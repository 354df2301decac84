"""Deterministic synthetic bank transactions for a consortium of banks (numpy + pyarrow, no Spark).

Each bank simulates accounts with a usual device or two, regular merchants and payees, a spend
level and an activity rate. Fraud events are short labelled sequences inserted into normal account
histories. Banks differ in size, fraud rate and above all in their mix of fraud typologies
(non-IID). Legitimate look-alikes (travel, transit bursts, phone changes, new payees, large
purchases) keep fraud from being separable by any single raw column.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from pipelines.contract import CHANNELS, COLUMN_NAMES

CONFIG_PATH = Path(__file__).with_name("config.yaml")
DEFAULT_START = datetime(2026, 1, 5, tzinfo=UTC)
TYPOLOGIES = ("card_testing", "account_takeover", "mule_transfer", "atm_cashout")
# Mean rows per event of each typology, so that typology weights are shares of fraud rows.
ROWS_PER_EVENT = {"card_testing": 7.1, "account_takeover": 2.0, "mule_transfer": 2.5,
                  "atm_cashout": 5.5}
RARE_TYPOLOGY_WEIGHT = 0.06
# Fraud rings move between banks: a typology that is rare at a bank arrives there late, in the
# last LATE_ARRIVAL share of the window, after other banks have already seen it.
LATE_ARRIVAL = 0.3
SIZE_DECAY = 0.72  # bank i's row share is proportional to SIZE_DECAY**i
BANKS = (  # name, currency, home country, dominant typologies
    ("alpine", "CHF", "CH", ("account_takeover", "mule_transfer")),
    ("baltic", "SEK", "SE", ("card_testing",)),
    ("celtic", "GBP", "GB", ("card_testing", "atm_cashout")),
    ("danube", "EUR", "AT", ("mule_transfer",)),
    ("elbe", "EUR", "DE", ("atm_cashout",)),
    ("fjord", "NOK", "NO", ("account_takeover",)),
    ("gdansk", "PLN", "PL", ("card_testing", "mule_transfer")),
    ("hudson", "USD", "US", ("account_takeover", "atm_cashout")),
)
ONLINE_ABROAD = ("IE", "NL", "LU", "US", "GB", "DE")
TRAVEL_DESTINATIONS = ("ES", "IT", "FR", "PT", "GR", "HR", "US", "TH", "TR", "GB", "DE", "AT")
CASHOUT_COUNTRIES = ("US", "TH", "TR", "MX", "BR", "RO", "BG", "ES", "IT", "GR")
PHYSICAL_CATEGORIES = {"grocery": 34, "restaurant": 22, "fuel": 12, "fashion": 10, "transport": 8,
                       "electronics": 5, "travel": 4, "utilities": 3, "gambling": 2}
ONLINE_CATEGORIES = {"digital_goods": 25, "fashion": 18, "electronics": 14, "grocery": 10,
                     "travel": 10, "utilities": 10, "transport": 7, "gambling": 6}
SPEND_MULTIPLIER = {"restaurant": 0.9, "fuel": 1.5, "travel": 4.0, "electronics": 3.0,
                    "fashion": 2.0, "digital_goods": 0.4, "transport": 0.5, "utilities": 2.5}
HOUR_WEIGHTS = np.array([3, 2, 1, 1, 1, 2, 5, 9, 11, 11, 12, 13, 14, 13, 12, 12, 13, 14, 15, 14,
                         12, 10, 7, 5], dtype=float)
CHANNEL_MIX = np.array([0.56, 0.30, 0.08, 0.06])  # in CHANNELS order
MERCHANT_PREFIX = {"card_present": "M", "ecommerce": "M", "transfer": "P", "atm": "A"}
CP, ECOM, TRANSFER, ATM = map(CHANNELS.index, ("card_present", "ecommerce", "transfer", "atm"))
SECOND, MINUTE, HOUR, DAY = 10**6, 60 * 10**6, 3600 * 10**6, 86400 * 10**6  # microseconds
NEVER = np.iinfo(np.int64).max // 2
ARROW_SCHEMA = pa.schema([
    ("transaction_id", pa.string()), ("event_time", pa.timestamp("us", tz="UTC")),
    ("account_id", pa.string()), ("amount", pa.float64()), ("currency", pa.string()),
    ("merchant_id", pa.string()), ("merchant_category", pa.string()), ("channel", pa.string()),
    ("country", pa.string()), ("device_id", pa.string()), ("is_fraud", pa.int32()),
])
assert tuple(ARROW_SCHEMA.names) == COLUMN_NAMES, "synthetic schema drifted from the contract"


@cache
def _features_config() -> dict:
    return yaml.safe_load(CONFIG_PATH.read_text())["features"]


@dataclass(frozen=True)
class BankProfile:
    """One synthetic bank: identity, size, fraud rate and its (non-IID) fraud-typology mix."""

    name: str
    currency: str
    home_country: str
    row_share: float  # share of the consortium's rows
    fraud_rate: float  # fraction of transactions that are fraud
    typology_weights: dict[str, float] = field(hash=False)  # expected share of fraud rows
    txns_per_account_day: float = 1.0  # mean account activity

    @property
    def dominant_typologies(self) -> tuple[str, ...]:
        return tuple(t for t, w in self.typology_weights.items() if w > RARE_TYPOLOGY_WEIGHT)

    def accounts_for(self, n_rows: int, days: int) -> int:
        """Number of accounts that produce about n_rows transactions in `days` days."""
        return max(20, round(n_rows / (days * self.txns_per_account_day)))


def bank_profiles(n_banks: int, seed: int) -> list[BankProfile]:
    """The first n_banks banks: fixed names, sizes and typologies; rates and activity from seed."""
    if n_banks < 1:
        raise ValueError("n_banks must be >= 1")
    rng = np.random.default_rng([seed, 0xBA4C])
    shares = SIZE_DECAY ** np.arange(n_banks)
    shares /= shares.sum()
    profiles = []
    for i in range(n_banks):
        name, currency, country, dominant = BANKS[i % len(BANKS)]
        if i >= len(BANKS):
            name, dominant = f"bank_{i + 1:02d}", (TYPOLOGIES[i % len(TYPOLOGIES)],)
        rare_total = RARE_TYPOLOGY_WEIGHT * (len(TYPOLOGIES) - len(dominant))
        weights = {t: (1 - rare_total) / len(dominant) if t in dominant else RARE_TYPOLOGY_WEIGHT
                   for t in TYPOLOGIES}
        profiles.append(BankProfile(
            name=name, currency=currency, home_country=country, row_share=float(shares[i]),
            fraud_rate=round(float(rng.uniform(0.001, 0.005)), 5), typology_weights=weights,
            txns_per_account_day=round(float(rng.uniform(0.8, 1.4)), 3)))
    return profiles


class _BankSimulation:
    """Accounts, merchant pools and rows of one bank; every random draw comes from `rng`."""

    def __init__(self, profile: BankProfile, n_rows: int, rng: np.random.Generator,
                 start: datetime, days: int):
        config = _features_config()
        self.profile, self.rng, self.n_rows = profile, rng, n_rows
        self.eur_rate = float(config["rates_to_base"][profile.currency])  # EUR per local unit
        self.categories = tuple(config["merchant_categories"])
        self.countries = tuple(sorted({profile.home_country, *ONLINE_ABROAD,
                                       *TRAVEL_DESTINATIONS, *CASHOUT_COUNTRIES}))
        self.home = self.countries.index(profile.home_country)
        self.abroad = self._country_ids(TRAVEL_DESTINATIONS)
        self.t0, self.span = int(start.timestamp()) * SECOND, days * DAY
        self.multiplier = np.array([SPEND_MULTIPLIER.get(c, 1.0) for c in self.categories])
        n = self.n_accounts = profile.accounts_for(n_rows, days)
        self.physical = self._merchant_pool(max(100, n // 5), PHYSICAL_CATEGORIES, abroad=0.0)
        self.online = self._merchant_pool(max(60, n // 20), ONLINE_CATEGORIES, abroad=0.35)
        self.atms = self._merchant_codes(max(20, n // 100))
        self.account_numbers = rng.choice(10**8, n, replace=False)
        self.spend_eur = rng.lognormal(np.log(28.0), 0.6, n)
        self.spend = self.spend_eur / self.eur_rate  # typical payment in local currency
        self.activity = rng.gamma(2.0, 0.5, n)
        self.devices = self._device_codes((n, 2))
        one_device = rng.random(n) < 0.6
        self.devices[one_device, 1] = self.devices[one_device, 0]
        self.regular_physical = rng.choice(len(self.physical["code"]), (n, 6), p=self.physical["p"])
        self.regular_online = rng.choice(len(self.online["code"]), (n, 4), p=self.online["p"])
        self.payees = self._merchant_codes((n, 3))
        self.home_atms = rng.integers(0, len(self.atms), (n, 2))
        self.channel_cdf = np.cumsum(rng.dirichlet(CHANNEL_MIX * 25, n), axis=1)
        # Commuters pay transit/parking in tiny bursts at a transport merchant they use regularly.
        self.commuters = np.flatnonzero(rng.random(n) < 0.05)
        for pool, regular in ((self.physical, self.regular_physical),
                              (self.online, self.regular_online)):
            transit = np.flatnonzero(pool["cat"] == self.categories.index("transport"))
            if len(transit):
                regular[self.commuters, 0] = rng.choice(transit, len(self.commuters))

    def _merchant_codes(self, size) -> np.ndarray:
        return self.rng.integers(10**8, 10**9, size)

    def _device_codes(self, size) -> np.ndarray:
        return self.rng.integers(10**11, 10**12, size)

    def _country_ids(self, names) -> np.ndarray:
        return np.array([self.countries.index(c) for c in names if c != self.profile.home_country])

    def _merchant_pool(self, size: int, category_weights: dict, abroad: float) -> dict:
        names = [c for c in category_weights if c in self.categories]
        weights = np.array([category_weights[c] for c in names], dtype=float)
        category_ids = np.array([self.categories.index(c) for c in names])
        abroad_ids = self._country_ids(ONLINE_ABROAD)
        popularity = 1.0 / (np.arange(size) + 10.0)
        return {"code": self._merchant_codes(size),
                "cat": category_ids[self.rng.choice(len(names), size, p=weights / weights.sum())],
                "country": np.where(self.rng.random(size) < abroad,
                                    self.rng.choice(abroad_ids, size), self.home),
                "p": popularity / popularity.sum()}

    def _cash(self, eur) -> np.ndarray:
        """ATM amounts: EUR-equivalent amounts rounded to a 'nice' local note unit."""
        unit = 10.0 ** max(0, round(np.log10(10 / self.eur_rate)))
        return np.maximum(np.round(np.asarray(eur) / self.eur_rate / unit), 1) * unit

    # ---- legitimate behaviour (vectorised) ---------------------------------------------------
    def legit_rows(self, n: int) -> dict[str, np.ndarray]:
        """n legitimate rows following each account's habits, plus travel and phone changes."""
        rng = self.rng
        acct = rng.choice(self.n_accounts, n, p=self.activity / self.activity.sum())
        hour = rng.choice(24, n, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
        day = rng.integers(0, self.span // DAY, n)
        t = self.t0 + day * DAY + hour * HOUR + rng.integers(0, HOUR, n)
        channel = (rng.random(n)[:, None] > self.channel_cdf[acct, :3]).sum(axis=1)
        rows = {"acct": acct, "t": t, "amount": np.zeros(n), "merchant": np.zeros(n, np.int64),
                "cat": np.zeros(n, np.int64), "channel": channel, "country": np.full(n, self.home),
                "device": np.full(n, -1, np.int64), "fraud": np.zeros(n, np.int8)}
        self._card_payments(rows, CP, self.physical, self.regular_physical, loyalty=0.85)
        self._card_payments(rows, ECOM, self.online, self.regular_online, loyalty=0.75)
        self._transfers(rows)
        self._withdrawals(rows)
        big = np.flatnonzero((channel <= ECOM) & (rng.random(n) < 0.005))  # large legit purchases
        rows["amount"][big] *= rng.uniform(4, 15, len(big))
        border = np.flatnonzero((channel == CP) & (rng.random(n) < 0.01))  # cross-border shopping
        rows["country"][border] = rng.choice(self.abroad, len(border))
        rows["merchant"][border] = self._merchant_codes(len(border))
        self._phone_changes(rows)
        self._travel(rows)
        return rows

    def _card_payments(self, rows, channel, pool, regular, loyalty) -> None:
        rng, i = self.rng, np.flatnonzero(rows["channel"] == channel)
        acct = rows["acct"][i]
        m = np.where(rng.random(len(i)) < loyalty,
                     regular[acct, rng.integers(0, regular.shape[1], len(i))],
                     rng.choice(len(pool["code"]), len(i), p=pool["p"]))
        rows["merchant"][i], rows["cat"][i], rows["country"][i] = (
            pool["code"][m], pool["cat"][m], pool["country"][m])
        noise = rng.lognormal(0, 0.55, len(i))
        rows["amount"][i] = self.spend[acct] * self.multiplier[pool["cat"][m]] * noise
        if channel == ECOM:
            rows["device"][i] = self.devices[acct, rng.integers(0, 2, len(i))]

    def _transfers(self, rows) -> None:
        """Transfers to known payees, 20% to new payees with normal amounts."""
        rng, i = self.rng, np.flatnonzero(rows["channel"] == TRANSFER)
        acct, k = rows["acct"][i], len(i)
        new_payee = rng.random(k) < 0.2
        rows["merchant"][i] = np.where(new_payee, self._merchant_codes(k),
                                       self.payees[acct, rng.integers(0, 3, k)])
        abroad = new_payee & (rng.random(k) < 0.1)
        rows["country"][i] = np.where(abroad, rng.choice(self.abroad, k), self.home)
        rows["cat"][i] = self.categories.index("p2p")
        amount = self.spend[acct] * 4 * rng.lognormal(0, 0.8, k)
        rows["amount"][i] = np.where(rng.random(k) < 0.4, np.ceil(amount / 10) * 10, amount)
        rows["device"][i] = self.devices[acct, rng.integers(0, 2, k)]

    def _withdrawals(self, rows) -> None:
        """Occasional ATM withdrawals, mostly at one of the account's home ATMs."""
        rng, i = self.rng, np.flatnonzero(rows["channel"] == ATM)
        acct, k = rows["acct"][i], len(i)
        atm = np.where(rng.random(k) < 0.9, self.home_atms[acct, rng.integers(0, 2, k)],
                       rng.integers(0, len(self.atms), k))
        rows["merchant"][i], rows["cat"][i] = self.atms[atm], self.categories.index("cash")
        eur = rng.choice([20, 50, 100, 200], k, p=[0.3, 0.35, 0.25, 0.1])
        rows["amount"][i] = self._cash(eur * np.clip(self.spend_eur[acct] / 28, 0.5, 3))

    def _phone_changes(self, rows) -> None:
        """Some accounts switch to a new phone mid-window and carry on as usual."""
        rng, n = self.rng, self.n_accounts
        change_at = np.where(rng.random(n) < 0.04, self.t0 + rng.integers(0, self.span, n), NEVER)
        new_device = self._device_codes(n)
        acct = rows["acct"]
        switched = np.flatnonzero((rows["device"] >= 0) & (rows["t"] >= change_at[acct]))
        rows["device"][switched] = new_device[acct[switched]]

    def _travel(self, rows) -> None:
        """Travellers' card-present/ATM rows during a 3-10 day trip are abroad, at new merchants."""
        rng, n, acct, t = self.rng, self.n_accounts, rows["acct"], rows["t"]
        share = min(0.3, 0.05 * self.span / (30 * DAY))
        trip_start = np.where(rng.random(n) < share, self.t0 + rng.integers(0, self.span, n), NEVER)
        trip_end = trip_start + rng.integers(3, 11, n) * DAY
        destination = rng.choice(self.abroad, n)
        on_trip = np.flatnonzero(np.isin(rows["channel"], (CP, ATM))
                                 & (t >= trip_start[acct]) & (t < trip_end[acct]))
        rows["country"][on_trip] = destination[acct[on_trip]]
        rows["merchant"][on_trip] = self._merchant_codes(len(on_trip))
        rows["amount"][on_trip] *= np.where(rows["channel"][on_trip] == CP, 1.3, 1.0)

    # ---- events: fraud typologies and legitimate bursts (small per-event loops) --------------
    def _start_time(self, night: bool = False, late: bool = False) -> int:
        """Event start after some account history (or late in the window), before it closes."""
        earliest = int(self.span * (1 - LATE_ARRIVAL)) if late else min(3 * DAY, self.span // 4)
        t = self.t0 + int(self.rng.integers(earliest, self.span - 12 * HOUR))
        return t - (t - self.t0) % DAY + int(self.rng.integers(0, 5 * HOUR)) if night else t

    def _online_row(self, a, t, amount, device, label, m=None) -> tuple:
        pool = self.online
        m = self.rng.integers(len(pool["code"])) if m is None else m
        code, cat, country = pool["code"][m], pool["cat"][m], pool["country"][m]
        return a, t, amount, code, cat, ECOM, country, device, label

    def _transfer_row(self, a, t, amount, device, abroad_share) -> tuple:
        country = self.rng.choice(self.abroad) if self.rng.random() < abroad_share else self.home
        payee = self._merchant_codes(None)
        return a, t, amount, payee, self.categories.index("p2p"), TRANSFER, country, device, 1

    def _card_testing(self, a: int, start: int) -> list[tuple]:
        """A burst of tiny e-commerce payments at new merchants, often then a larger one."""
        rng, device = self.rng, self._device_codes(None)
        gaps = rng.exponential(45 * SECOND, rng.integers(3, 11))
        times = start + np.cumsum(gaps).astype(np.int64)
        rows = [self._online_row(a, t, rng.uniform(0.2, 1.99) / self.eur_rate, device, 1)
                for t in times]
        if rng.random() < 0.6:
            t = times[-1] + rng.integers(2, 30) * MINUTE
            rows.append(self._online_row(a, t, rng.uniform(80, 600) / self.eur_rate, device, 1))
        return rows

    def _account_takeover(self, a: int, start: int) -> list[tuple]:
        """A new device, then 1-3 payments or transfers within an hour, several times the usual."""
        rng, device = self.rng, self._device_codes(None)
        times = start + np.sort(rng.integers(0, HOUR, rng.integers(1, 4)))
        return [self._online_row(a, t, self.spend[a] * rng.uniform(5, 20), device, 1)
                if rng.random() < 0.5 else
                self._transfer_row(a, t, self.spend[a] * 4 * rng.uniform(3, 10), device, 0.2)
                for t in times]

    def _mule_transfer(self, a: int, start: int) -> list[tuple]:
        """Large transfers to new payees, mostly at night, from the own or a new device."""
        rng = self.rng
        device = self.devices[a, 0] if rng.random() < 0.7 else self._device_codes(None)
        gaps = rng.integers(10, 120, rng.integers(1, 5)) * MINUTE
        times = start + np.cumsum(gaps)
        return [self._transfer_row(a, t, self.spend[a] * 4 * rng.uniform(4, 20), device, 0.4)
                for t in times]

    def _atm_cashout(self, a: int, start: int) -> list[tuple]:
        """Several withdrawals at foreign ATMs within a few hours."""
        rng = self.rng
        country = rng.choice(self._country_ids(CASHOUT_COUNTRIES))
        times = start + np.cumsum(rng.integers(5, 45, rng.integers(3, 9))) * MINUTE
        amounts = self._cash(rng.choice([200, 300, 400, 500], len(times)))
        cash = self.categories.index("cash")
        return [(a, t, x, self._merchant_codes(None), cash, ATM, country, -1, 1)
                for t, x in zip(times, amounts)]

    def _transit_burst(self) -> list[tuple]:
        """Legitimate look-alike: tiny payments within minutes at a merchant the commuter knows."""
        rng = self.rng
        a = int(rng.choice(self.commuters))
        gaps = rng.exponential(60 * SECOND, rng.integers(3, 7))
        times = self._start_time() + np.cumsum(gaps).astype(np.int64)
        amounts = rng.uniform(0.8, 4, len(times)) / self.eur_rate
        if rng.random() < 0.4:  # parking app
            m, device = self.regular_online[a, 0], self.devices[a, 0]
            return [self._online_row(a, t, x, device, 0, m) for t, x in zip(times, amounts)]
        pool, m = self.physical, self.regular_physical[a, 0]
        return [(a, t, x, pool["code"][m], pool["cat"][m], CP, pool["country"][m], -1, 0)
                for t, x in zip(times, amounts)]

    def event_rows(self, legit: dict, n_fraud: int, n_bursts: int) -> list[tuple]:
        """n_fraud fraud rows on accounts with prior history, then n_bursts transit-burst rows."""
        rng, rows = self.rng, []
        build = {"card_testing": self._card_testing, "account_takeover": self._account_takeover,
                 "mule_transfer": self._mule_transfer, "atm_cashout": self._atm_cashout}
        weights = np.array([self.profile.typology_weights.get(t, 0.0) / ROWS_PER_EVENT[t]
                            for t in TYPOLOGIES])
        history = np.argsort(legit["t"], kind="stable")
        history_t, history_acct = legit["t"][history], legit["acct"][history]
        while len(rows) < n_fraud:  # the last event is cut to hit the target exactly
            typology = TYPOLOGIES[rng.choice(len(TYPOLOGIES), p=weights / weights.sum())]
            start = self._start_time(night=typology == "mule_transfer" and rng.random() < 0.6,
                                     late=typology not in self.profile.dominant_typologies)
            earlier = np.searchsorted(history_t, start)  # legit rows before the event
            a = history_acct[rng.integers(earlier)] if earlier else rng.integers(self.n_accounts)
            rows += build[typology](int(a), start)[: n_fraud - len(rows)]
        while len(rows) < n_fraud + n_bursts:
            rows += self._transit_burst()[: n_fraud + n_bursts - len(rows)]
        return rows

    def table(self, unlabelled_days: int) -> pa.Table:
        """All rows sorted by event time, as an Arrow table in contract column order."""
        n_fraud = min(self.n_rows, max(1, round(self.profile.fraud_rate * self.n_rows)))
        n_bursts = min(self.n_rows - n_fraud, round(0.01 * self.n_rows) * bool(len(self.commuters)))
        legit = self.legit_rows(self.n_rows - n_fraud - n_bursts)
        events = self.event_rows(legit, n_fraud, n_bursts)
        columns = {k: np.concatenate([v, np.array([r[j] for r in events], dtype=v.dtype)])
                   for j, (k, v) in enumerate(legit.items())}
        end = self.t0 + self.span
        columns["t"] = np.minimum(columns["t"], end - 1)
        order = np.argsort(columns["t"], kind="stable")
        c = {k: v[order] for k, v in columns.items()}
        name, n = self.profile.name, len(order)
        merchant_prefixes = [MERCHANT_PREFIX[ch] for ch in CHANNELS]
        return pa.Table.from_arrays([
            _prefixed(f"{name}-tx-", np.arange(n), 9),
            pa.array(c["t"], pa.timestamp("us", tz="UTC")),
            _prefixed(f"{name}-acct-", self.account_numbers[c["acct"]], 8),
            pa.array(np.maximum(np.round(c["amount"], 2), 0.01)),
            _vocab([self.profile.currency], np.zeros(n, np.int64)),
            _prefixed(_vocab(merchant_prefixes, c["channel"]), c["merchant"], 9),
            _vocab(self.categories, c["cat"]),
            _vocab(CHANNELS, c["channel"]),
            _vocab(self.countries, c["country"]),
            _prefixed("dev-", c["device"], 12, null_mask=c["device"] < 0),
            pa.array(c["fraud"].astype(np.int32), mask=c["t"] >= end - unlabelled_days * DAY),
        ], schema=ARROW_SCHEMA)


def _vocab(values, indices: np.ndarray) -> pa.Array:
    return pc.take(pa.array(list(values), pa.string()), pa.array(indices))


def _prefixed(prefix, codes: np.ndarray, width: int, null_mask=None) -> pa.Array:
    numbers = pc.cast(pa.array(codes, pa.int64(), mask=null_mask), pa.string())
    digits = pc.utf8_lpad(numbers, width, "0")
    return pc.binary_join_element_wise(prefix, digits, "")


def generate_bank(profile: BankProfile, n_rows: int, seed: int, start: datetime = DEFAULT_START,
                  days: int = 60, *, unlabelled_days: int = 0) -> pa.Table:
    """Exactly n_rows transactions of one bank in [start, start + days), deterministic in seed.

    is_fraud is null for rows in the last `unlabelled_days` days (data to score).
    """
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    if days < 1 or n_rows < 1 or not 0 <= unlabelled_days <= days:
        raise ValueError("need days >= 1, n_rows >= 1 and 0 <= unlabelled_days <= days")
    if start.timestamp() + days * 86400 > datetime.now(UTC).timestamp():
        raise ValueError("the generated window must lie in the past")
    rng = np.random.default_rng([seed, zlib.crc32(profile.name.encode())])
    return _BankSimulation(profile, n_rows, rng, start, days).table(unlabelled_days)


def split_rows(total_rows: int, profiles: list[BankProfile]) -> list[int]:
    """total_rows split by the banks' row shares (largest remainder, sums exactly)."""
    raw = np.array([p.row_share for p in profiles]) * total_rows
    sizes = np.floor(raw).astype(int)
    sizes[np.argsort(sizes - raw, kind="stable")[: total_rows - sizes.sum()]] += 1
    return sizes.tolist()


def write_banks(out_dir: str | Path, n_banks: int, total_rows: int, seed: int, days: int = 60,
                unlabelled_days: int = 0, start: datetime = DEFAULT_START) -> dict[str, Path]:
    """Write out_dir/<bank>/transactions.parquet atomically for each bank; return {bank: path}."""
    profiles, paths = bank_profiles(n_banks, seed), {}
    for profile, n_rows in zip(profiles, split_rows(total_rows, profiles)):
        table = generate_bank(profile, n_rows, seed, start, days, unlabelled_days=unlabelled_days)
        bank_dir = Path(out_dir) / profile.name
        bank_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=bank_dir, prefix=".transactions.", suffix=".parquet.tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, bank_dir / "transactions.parquet")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths[profile.name] = bank_dir / "transactions.parquet"
    return paths
