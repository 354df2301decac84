"""Deterministic synthetic bank transactions for a consortium of banks (numpy + pyarrow, no Spark).

Each bank simulates accounts with a usual device or two, regular merchants and payees, a spend
level, an activity rate and daily rhythm. Fraud events are short labelled sequences inserted into
normal account histories. Banks differ in size, fraud rate and above all in their mix of fraud
typologies (non-IID). Fraud is deliberately hard: every typology has a blatant and a subtle form
(remote-access takeovers from the customer's own device, moderate daytime mule transfers, short
card tests at ordinary merchants, cash-outs where tourists go), legitimate look-alikes are common
(new phones and laptops followed by a purchase, in-app top-up bursts at new merchants, transit
bursts, tourists' cash bursts abroad, large transfers to new payees, night owls) and some fraud is
never reported (labelled 0). No single raw column separates fraud.
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
ROWS_PER_EVENT = {"card_testing": 5.1, "account_takeover": 1.9, "mule_transfer": 2.3,
                  "atm_cashout": 4.1}
RARE_TYPOLOGY_WEIGHT = 0.06
# Fraud rings move between banks: a typology that is rare at a bank arrives there late, in the
# last LATE_ARRIVAL share of the window, after other banks have already seen it.
LATE_ARRIVAL = 0.25
# Each fraud event is blatant or, with this chance, subtle: close to legitimate behaviour.
SUBTLE = 0.2
UNREPORTED = 0.05  # share of fraud events the customer never notices or reports: labelled 0
DEVICE_CHANGE = 0.08  # chance an account replaces its phone (and, separately, its laptop)
NIGHT_OWLS = 0.06  # share of accounts (shift workers) whose day is shifted into the night
LOOK_ALIKE_SHARE = 0.02  # rows in legitimate bursts that resemble fraud events
# Row shares of the look-alike kinds: transit, in-app top-ups, tourists' cash, new-device purchase.
LOOK_ALIKE_MIX = (0.35, 0.3, 0.2, 0.15)
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
CASHOUT_ONLY = ("MX", "BR", "RO", "BG")  # cash-out countries few tourists visit
PHYSICAL_CATEGORIES = {"grocery": 34, "restaurant": 22, "fuel": 12, "fashion": 10, "transport": 8,
                       "electronics": 5, "travel": 4, "utilities": 3, "gambling": 2}
ONLINE_CATEGORIES = {"digital_goods": 25, "fashion": 18, "electronics": 14, "grocery": 10,
                     "travel": 10, "utilities": 10, "transport": 7, "gambling": 6}
SPEND_MULTIPLIER = {"restaurant": 0.9, "fuel": 1.5, "travel": 4.0, "electronics": 3.0,
                    "fashion": 2.0, "digital_goods": 0.4, "transport": 0.5, "utilities": 2.5}
HOUR_WEIGHTS = np.array([3, 2, 1, 1, 1, 2, 5, 9, 11, 11, 12, 13, 14, 13, 12, 12, 13, 14, 15, 14,
                         12, 10, 7, 5], dtype=float)
FRAUD_HOURS = HOUR_WEIGHTS + 4  # fraudsters keep a flatter clock
NIGHT_HOURS = np.array([1.0] * 5 + [0.0] * 19)
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
        self.cash, self.p2p = self.categories.index("cash"), self.categories.index("p2p")
        self.countries = tuple(sorted({profile.home_country, *ONLINE_ABROAD,
                                       *TRAVEL_DESTINATIONS, *CASHOUT_ONLY}))
        self.home = self.countries.index(profile.home_country)
        self.abroad = self._country_ids(TRAVEL_DESTINATIONS)
        self.t0, self.span = int(start.timestamp()) * SECOND, days * DAY
        self.multiplier = np.array([SPEND_MULTIPLIER.get(c, 1.0) for c in self.categories])
        n = self.n_accounts = profile.accounts_for(n_rows, days)
        self.physical = self._merchant_pool(max(100, n // 5), PHYSICAL_CATEGORIES, abroad=0.0)
        self.online = self._merchant_pool(max(60, n // 20), ONLINE_CATEGORIES, abroad=0.35)
        self.digital = np.flatnonzero(self.online["cat"] == self.categories.index("digital_goods"))
        self.atms = self._merchant_codes(max(20, n // 100))
        self.account_numbers = rng.choice(10**8, n, replace=False)
        self.spend_eur = rng.lognormal(np.log(28.0), 0.6, n)
        self.spend = self.spend_eur / self.eur_rate  # typical payment in local currency
        self.activity = rng.gamma(2.0, 0.5, n)
        self.hour_shift = np.where(rng.random(n) < NIGHT_OWLS, rng.integers(6, 11, n), 0)
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
        """n legitimate rows following each account's habits, plus travel and device changes."""
        rng = self.rng
        acct = rng.choice(self.n_accounts, n, p=self.activity / self.activity.sum())
        hour = (rng.choice(24, n, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum()) + self.hour_shift[acct]) % 24
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
        self._device_changes(rows)
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
        """Transfers to known payees; 20% to new payees, a few of them large (rent deposit, car)."""
        rng, i = self.rng, np.flatnonzero(rows["channel"] == TRANSFER)
        acct, k = rows["acct"][i], len(i)
        new_payee = rng.random(k) < 0.2
        rows["merchant"][i] = np.where(new_payee, self._merchant_codes(k),
                                       self.payees[acct, rng.integers(0, 3, k)])
        abroad = new_payee & (rng.random(k) < 0.1)
        rows["country"][i] = np.where(abroad, rng.choice(self.abroad, k), self.home)
        rows["cat"][i] = self.p2p
        amount = self.spend[acct] * 4 * rng.lognormal(0, 0.8, k)
        amount *= np.where(new_payee & (rng.random(k) < 0.08), rng.uniform(3, 12, k), 1.0)
        rows["amount"][i] = np.where(rng.random(k) < 0.4, np.ceil(amount / 10) * 10, amount)
        rows["device"][i] = self.devices[acct, rng.integers(0, 2, k)]

    def _withdrawals(self, rows) -> None:
        """Occasional ATM withdrawals, mostly at one of the account's home ATMs."""
        rng, i = self.rng, np.flatnonzero(rows["channel"] == ATM)
        acct, k = rows["acct"][i], len(i)
        atm = np.where(rng.random(k) < 0.9, self.home_atms[acct, rng.integers(0, 2, k)],
                       rng.integers(0, len(self.atms), k))
        rows["merchant"][i], rows["cat"][i] = self.atms[atm], self.cash
        eur = rng.choice([20, 50, 100, 200], k, p=[0.3, 0.35, 0.25, 0.1])
        rows["amount"][i] = self._cash(eur * np.clip(self.spend_eur[acct] / 28, 0.5, 3))

    def _device_changes(self, rows) -> None:
        """Some accounts replace their phone and/or laptop mid-window and carry on as usual."""
        rng, n, acct, device = self.rng, self.n_accounts, rows["acct"], rows["device"]
        self.change_at = np.where(rng.random((n, 2)) < DEVICE_CHANGE,
                                  self.t0 + rng.integers(0, self.span, (n, 2)), NEVER)
        self.change_at[self.devices[:, 0] == self.devices[:, 1], 1] = NEVER  # one device only
        self.new_devices = self._device_codes((n, 2))
        for slot in (0, 1):
            hit = np.flatnonzero((device == self.devices[acct, slot])
                                 & (rows["t"] >= self.change_at[acct, slot]))
            device[hit] = self.new_devices[acct[hit], slot]
        self.changed = np.flatnonzero(self.change_at.ravel() < NEVER)  # account * 2 + slot

    def _device_at(self, a: int, t: int) -> int:
        """The account's main device (its phone) in use at time t."""
        return int(self.new_devices[a, 0] if t >= self.change_at[a, 0] else self.devices[a, 0])

    def _travel(self, rows) -> None:
        """Travellers' card-present/ATM rows during a 3-10 day trip are abroad, at new merchants."""
        rng, n, acct, t = self.rng, self.n_accounts, rows["acct"], rows["t"]
        share = min(0.3, 0.06 * self.span / (30 * DAY))
        self.trip_start = np.where(rng.random(n) < share, self.t0 + rng.integers(0, self.span, n),
                                   NEVER)
        self.trip_end = self.trip_start + rng.integers(3, 11, n) * DAY
        self.destination = rng.choice(self.abroad, n)
        self.travellers = np.flatnonzero(self.trip_start < NEVER)
        on_trip = np.flatnonzero(np.isin(rows["channel"], (CP, ATM))
                                 & (t >= self.trip_start[acct]) & (t < self.trip_end[acct]))
        rows["country"][on_trip] = self.destination[acct[on_trip]]
        rows["merchant"][on_trip] = self._merchant_codes(len(on_trip))
        rows["amount"][on_trip] *= np.where(rows["channel"][on_trip] == CP, 1.3, 1.0)

    # ---- events: fraud typologies and legitimate look-alikes (small per-event loops) ---------
    def _start_time(self, hours=HOUR_WEIGHTS, late: bool = False) -> int:
        """Event start at an hour drawn from `hours`, on a day after some account history (or
        late in the window), at least 12 hours before the window closes where possible."""
        first = int(np.ceil((1 - LATE_ARRIVAL) * self.span / DAY)) if late else 3
        day = self.rng.integers(min(first, self.span // DAY - 1), self.span // DAY)
        hour = self.rng.choice(24, p=hours / hours.sum())
        t = int(day * DAY + hour * HOUR + self.rng.integers(0, HOUR))
        return self.t0 + (t - DAY if t > self.span - 12 * HOUR and t >= DAY else t)

    def _account_before(self, t: int) -> int:
        """An account drawn like a random transaction before t (active accounts more often)."""
        earlier = np.searchsorted(self.history_t, t)
        return int(self.history_acct[self.rng.integers(earlier)] if earlier
                   else self.rng.integers(self.n_accounts))

    def _online_row(self, a, t, amount, device, label, m=None) -> tuple:
        pool = self.online
        m = self.rng.choice(len(pool["code"]), p=pool["p"]) if m is None else m
        code, cat, country = pool["code"][m], pool["cat"][m], pool["country"][m]
        return a, t, amount, code, cat, ECOM, country, device, label

    def _transfer_row(self, a, t, amount, device, abroad_share) -> tuple:
        country = self.rng.choice(self.abroad) if self.rng.random() < abroad_share else self.home
        return a, t, amount, self._merchant_codes(None), self.p2p, TRANSFER, country, device, 1

    def _atm_row(self, a, t, amount, country, label) -> tuple:
        return a, t, amount, self._merchant_codes(None), self.cash, ATM, country, -1, label

    def _small_burst(self, a, start, device, label, sizes, digital_share, same,
                     tiny=(0.5, 4.9)) -> list[tuple]:
        """Tiny e-commerce payments minutes apart, at one merchant or at a different one each."""
        rng = self.rng
        times = start + np.cumsum(rng.exponential(60 * SECOND, rng.integers(*sizes))).astype(int)
        pool = (self.digital if len(self.digital) and rng.random() < digital_share
                else np.arange(len(self.online["code"])))
        p = self.online["p"][pool] / self.online["p"][pool].sum()
        merchants = np.resize(rng.choice(pool, 1 if rng.random() < same else len(times), p=p),
                              len(times))  # one merchant throughout, or a different one each
        return [self._online_row(a, t, rng.uniform(*tiny) / self.eur_rate, device, label, m)
                for t, m in zip(times, merchants)]

    def _card_testing(self, a: int, start: int, subtle: bool) -> list[tuple]:
        """Tiny payments minutes apart from the fraudster's device, often then a larger purchase;
        subtle: 2-4 at ordinary digital-goods merchants, sometimes from the hijacked device."""
        rng = self.rng
        own = subtle and rng.random() < 0.5
        device = self._device_at(a, start) if own else self._device_codes(None)
        rows = (self._small_burst(a, start, device, 1, (2, 5), 0.8, same=0.7, tiny=(0.5, 4.9))
                if subtle else
                self._small_burst(a, start, device, 1, (3, 9), 0.3, same=0.2, tiny=(0.2, 2.0)))
        if rng.random() < (0.3 if subtle else 0.6):
            t = rows[-1][1] + rng.integers(2, 60) * MINUTE
            eur = self.spend_eur[a] * rng.uniform(2, 5) if subtle else rng.uniform(80, 600)
            rows.append(self._online_row(a, t, eur / self.eur_rate, device, 1))
        return rows

    def _account_takeover(self, a: int, start: int, subtle: bool) -> list[tuple]:
        """Payments or transfers within an hour from a new device at 5-20x the usual; subtle:
        by remote access from the customer's own device at 2-6x."""
        rng = self.rng
        device = self._device_at(a, start) if subtle else self._device_codes(None)
        times = start + np.sort(rng.integers(0, HOUR, rng.integers(1, 3 if subtle else 4)))
        factor = (2, 6) if subtle else (5, 20)
        return [self._online_row(a, t, self.spend[a] * rng.uniform(*factor), device, 1)
                if rng.random() < 0.5 else self._transfer_row(
                    a, t, self.spend[a] * 4 * rng.uniform(*factor) / 2, device, 0.2)
                for t in times]

    def _mule_transfer(self, a: int, start: int, subtle: bool) -> list[tuple]:
        """Large transfers to new payees, often at night; subtle: 1-2 moderate daytime ones
        from the customer's own device."""
        rng = self.rng
        device = (self._device_at(a, start) if subtle or rng.random() < 0.7
                  else self._device_codes(None))
        gaps = rng.integers(10, 120, rng.integers(1, 3 if subtle else 5)) * MINUTE
        times, factor = start + np.cumsum(gaps), (2, 5) if subtle else (4, 20)
        return [self._transfer_row(a, t, self.spend[a] * 4 * rng.uniform(*factor),
                                   device, 0.1 if subtle else 0.4) for t in times]

    def _atm_cashout(self, a: int, start: int, subtle: bool) -> list[tuple]:
        """Several large withdrawals at new foreign ATMs within hours; subtle: 2-3 smaller ones
        where tourists go, or at home."""
        rng = self.rng
        if subtle:
            country = self.home if rng.random() < 0.3 else rng.choice(self.abroad)
            count, gaps, eur = rng.integers(2, 4), (20, 120), (100, 300)
        else:
            country = rng.choice(self._country_ids(CASHOUT_ONLY) if rng.random() < 0.5
                                 else self.abroad)
            count, gaps, eur = rng.integers(3, 7), (5, 45), (200, 500)
        times = start + np.cumsum(rng.integers(*gaps, count)) * MINUTE
        return [self._atm_row(a, t, x, country, 1)
                for t, x in zip(times, self._cash(rng.uniform(*eur, count)))]

    def _transit_burst(self) -> list[tuple]:
        """Legitimate look-alike: tiny payments within minutes at a merchant the commuter knows."""
        rng = self.rng
        a = int(rng.choice(self.commuters))
        gaps = rng.exponential(60 * SECOND, rng.integers(3, 7))
        times = self._start_time() + np.cumsum(gaps).astype(np.int64)
        amounts = rng.uniform(0.8, 4, len(times)) / self.eur_rate
        if rng.random() < 0.4:  # parking app
            m, device = self.regular_online[a, 0], self._device_at(a, times[0])
            return [self._online_row(a, t, x, device, 0, m) for t, x in zip(times, amounts)]
        pool, m = self.physical, self.regular_physical[a, 0]
        return [(a, t, x, pool["code"][m], pool["cat"][m], CP, pool["country"][m], -1, 0)
                for t, x in zip(times, amounts)]

    def _digital_burst(self) -> list[tuple]:
        """Legitimate look-alike: in-app purchases and top-ups, often at new merchants and
        sometimes from a brand-new tablet or console."""
        start = self._start_time()
        a = self._account_before(start)
        device = self._device_at(a, start) if self.rng.random() < 0.85 else self._device_codes(None)
        return self._small_burst(a, start, device, 0, (2, 7), 0.8, same=0.7)

    def _tourist_cash(self) -> list[tuple]:
        """Legitimate look-alike: a traveller draws cash at new ATMs abroad, several times within
        hours (daily limits), often right on arrival."""
        rng = self.rng
        a = int(rng.choice(self.travellers))
        days = (self.trip_end[a] - self.trip_start[a]) // DAY
        start = self.trip_start[a] + (0 if rng.random() < 0.35 else rng.integers(0, days) * DAY)
        start = min(start, self.t0 + self.span - 8 * HOUR)
        times = start + np.cumsum(rng.integers(20, 240, rng.integers(2, 4))) * MINUTE
        return [self._atm_row(a, t, x, self.destination[a], 0)
                for t, x in zip(times, self._cash(rng.uniform(50, 300, len(times))))]

    def _new_device_purchase(self) -> list[tuple]:
        """Legitimate look-alike: a larger online purchase from a newly set-up phone or laptop."""
        rng = self.rng
        a, slot = divmod(int(rng.choice(self.changed)), 2)
        t = self.change_at[a, slot] + rng.integers(0, 2 * DAY) * (rng.random() < 0.6)
        return [self._online_row(a, t, self.spend[a] * rng.uniform(2, 8),
                                 self.new_devices[a, slot], 0)]

    def event_rows(self, legit: dict, n_fraud: int, n_look_alike: int) -> list[tuple]:
        """n_fraud labelled fraud rows on accounts with prior history (plus the rows of unreported
        fraud events, labelled 0), then legitimate look-alikes up to n_fraud + n_look_alike rows."""
        rng, rows, reported, total = self.rng, [], 0, n_fraud + n_look_alike
        build = {"card_testing": self._card_testing, "account_takeover": self._account_takeover,
                 "mule_transfer": self._mule_transfer, "atm_cashout": self._atm_cashout}
        weights = np.array([self.profile.typology_weights.get(t, 0.0) / ROWS_PER_EVENT[t]
                            for t in TYPOLOGIES])
        history = np.argsort(legit["t"], kind="stable")
        self.history_t, self.history_acct = legit["t"][history], legit["acct"][history]
        while reported < n_fraud:  # the last event is cut to hit the target exactly
            typology = TYPOLOGIES[rng.choice(len(TYPOLOGIES), p=weights / weights.sum())]
            subtle = rng.random() < SUBTLE
            night = typology == "mule_transfer" and not subtle and rng.random() < 0.6
            hours = NIGHT_HOURS if night else HOUR_WEIGHTS if subtle else FRAUD_HOURS
            start = self._start_time(hours, late=typology not in self.profile.dominant_typologies)
            event = build[typology](self._account_before(start), start, subtle)
            if rng.random() < UNREPORTED:  # takes room from the look-alikes
                room = max(0, total - len(rows) - (n_fraud - reported))
                rows += [row[:-1] + (0,) for row in event][:room]
            else:
                rows += event[: n_fraud - reported]
                reported += len(event[: n_fraud - reported])
        kinds = [(make, share) for make, share, population in zip(
            (self._transit_burst, self._digital_burst, self._tourist_cash,
             self._new_device_purchase), LOOK_ALIKE_MIX,
            (self.commuters, self.online["code"], self.travellers, self.changed)) if len(population)]
        shares = np.array([share for _, share in kinds])
        while len(rows) < total:
            make = kinds[rng.choice(len(kinds), p=shares / shares.sum())][0]
            rows += make()[: total - len(rows)]
        return rows

    def table(self, unlabelled_days: int) -> pa.Table:
        """All rows sorted by event time, as an Arrow table in contract column order."""
        n_fraud = min(self.n_rows, max(1, round(self.profile.fraud_rate * self.n_rows)))
        n_look_alike = min(self.n_rows - n_fraud, round(LOOK_ALIKE_SHARE * self.n_rows))
        legit = self.legit_rows(self.n_rows - n_fraud - n_look_alike)
        events = self.event_rows(legit, n_fraud, n_look_alike)
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
