"""A seeded generator of labelled payment histories, with the fraud patterns risk teams actually see.

Why synthetic: public fraud data sets have no entity ids or event times a streaming platform can use,
so the platform needs histories where per-entity time windows matter. The patterns:

- ``normal``: users with daily rhythms (activity by hour of day), a per-user rate and typical amount
  (lognormal), 1-3 usual devices, a home country and favourite merchant categories. To keep the task
  honest some normal users look suspicious for a while: micro-payment bursts (gaming, transit),
  occasional big purchases, a new phone, travel abroad, a device shared with a household member.
- ``card_testing``: a compromised card is tested with many tiny payments within minutes from the
  fraudster's device, then cashed out with one to three large ones. Some testers go slowly.
- ``account_takeover``: after a normal history, someone else logs in from a new device (usually a new
  country) and makes rapid high-value payments; everything from the takeover on is fraud (the owner
  is locked out). Some takeovers spend slowly.
- ``fraud_ring``: fresh accounts sharing a few devices make mid-size payments at high velocity. Some
  rings are slow.

Every event is a ``payment`` with attributes ``device_id``, ``country``, ``merchant_category`` and
``is_new_device``. ``is_new_device`` is causal: true when the entity had not used that device before
the event. Normal users' usual devices count as known from before the data starts (as a device
fingerprinting service would know them from the account's history); new accounts know no device.

Everything is vectorised with numpy; the same seed gives byte-identical output.
"""

from __future__ import annotations

import math

import numpy as np

from decision_platform.data.columns import EventColumnsBuilder
from decision_platform.data.dataset import LabelledEvents

#: 2026-01-05T00:00:00Z, a Monday; all timestamps are this plus an offset (valid schema range).
BASE_EPOCH = 1_767_571_200.0
DAY = 86_400.0

SCENARIOS = ("normal", "card_testing", "account_takeover", "fraud_ring")
NORMAL, CARD_TESTING, ACCOUNT_TAKEOVER, FRAUD_RING = range(4)

COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "PL", "BR", "MX", "IN", "NG", "PH", "RO", "TR")
COUNTRY_P = np.array([30, 12, 11, 9, 7, 6, 4, 4, 4, 3, 3, 2, 2, 2, 1], dtype=float)
COUNTRY_P /= COUNTRY_P.sum()

CATEGORIES = (
    "grocery",
    "restaurant",
    "transport",
    "retail",
    "fuel",
    "pharmacy",
    "entertainment",
    "travel",
    "electronics",
    "digital_goods",
    "gift_cards",
    "money_transfer",
    "gaming",
)
_CAT = {name: i for i, name in enumerate(CATEGORIES)}
#: How popular each category is with normal users, and how its amounts scale a user's typical amount.
CATEGORY_P = np.array([22, 16, 12, 14, 8, 5, 6, 2, 3, 5, 1, 2, 4], dtype=float)
CATEGORY_P /= CATEGORY_P.sum()
CATEGORY_SCALE = np.array([1.0, 0.8, 0.4, 1.3, 1.2, 0.6, 0.9, 4.0, 3.0, 0.3, 1.5, 2.5, 0.4])

#: Relative activity by hour of day (UTC): quiet nights, lunch and evening peaks.
HOUR_P = np.array(
    [
        0.3,
        0.2,
        0.15,
        0.1,
        0.1,
        0.2,
        0.5,
        1.0,
        1.5,
        1.8,
        2.0,
        2.2,
        2.6,
        2.4,
        2.0,
        2.0,
        2.2,
        2.5,
        2.8,
        3.0,
        2.8,
        2.2,
        1.5,
        0.8,
    ]
)
HOUR_P /= HOUR_P.sum()
#: Fraud starts at any hour, more often at night while victims sleep (30% extra mass on 00-06h).
FRAUD_HOUR_P = 0.7 / 24 + 0.3 * (np.arange(24) < 6) / 6

#: Share of fraud events each scenario is budgeted, and its expected events per incident (measured).
_FRAUD_MIX = {CARD_TESTING: 0.40, ACCOUNT_TAKEOVER: 0.25, FRAUD_RING: 0.35}
_EVENTS_PER_INCIDENT = {CARD_TESTING: 18.0, ACCOUNT_TAKEOVER: 5.9, FRAUD_RING: 43.0}
_RING_SIZE = (3, 8)  # members per ring, inclusive
_MEAN_SESSION_EVENTS = 1.43  # normal events per session: plain sessions and micro-payment bursts


class _Rows:
    """Columnar event rows collected from every scenario before they become `Event`s."""

    COLUMNS = ("t", "entity", "amount", "device", "country", "category", "label", "scenario")

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {c: [] for c in self.COLUMNS}

    def add(self, **columns: np.ndarray | int | float) -> None:
        n = len(np.atleast_1d(columns["t"]))
        for name in self.COLUMNS:
            self.parts[name].append(np.broadcast_to(np.asarray(columns[name]), (n,)).copy())

    def concat(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.parts.items()}


class _Devices:
    """Hands out device numbers; each becomes an opaque, unique id string at the end."""

    def __init__(self) -> None:
        self.count = 0

    def new(self, k: int) -> np.ndarray:
        ids = np.arange(self.count, self.count + k, dtype=np.int64)
        self.count += k
        return ids


#: About 40 events per entity per week (normal traffic; fraud adds a few percent).
EVENTS_PER_ENTITY_DAY = 40 / 7
#: The largest synthetic data set (expected events): beyond it memory runs out long before training ends.
MAX_EVENTS = 20_000_000


def generate(
    n_entities: int = 2000, days: float = 7.0, seed: int = 0, fraud_share: float = 0.02
) -> LabelledEvents:
    """Generate `days` of labelled payments for `n_entities` entities, identical for the same seed.

    `fraud_share` is the target fraction of fraud-labelled events (the realised rate lands near it;
    0 gives only normal traffic). About 40 events per entity per week; fraud touches ~10% of entities.
    """
    if n_entities < 1 or days <= 0 or not 0.0 <= fraud_share < 0.5:
        raise ValueError("need n_entities >= 1, days > 0 and 0 <= fraud_share < 0.5")
    expected = n_entities * days * EVENTS_PER_ENTITY_DAY
    if not expected <= MAX_EVENTS:  # numpy's "Maximum allowed dimension", a MemoryError or hours of work
        raise ValueError(
            f"{n_entities:,} entities over {days:g} days are about {expected:.3g} events, more than the "
            f"{MAX_EVENTS:,} a synthetic data set may hold: fewer entities or days"
        )
    rng = np.random.default_rng(seed)
    span = days * DAY
    devices = _Devices()
    rows = _Rows()

    # Ring accounts come out of the entity budget; size the fraud from the expected normal volume.
    profiles = _normal_profiles(rng, n_entities, devices)
    expected_normal = float(profiles["rate"].sum()) * days * _MEAN_SESSION_EVENTS
    target_fraud = fraud_share / (1.0 - fraud_share) * expected_normal
    incidents = {
        s: (max(1, round(target_fraud * share / _EVENTS_PER_INCIDENT[s])) if fraud_share > 0 else 0)
        for s, share in _FRAUD_MIX.items()
    }
    ring_sizes = rng.integers(_RING_SIZE[0], _RING_SIZE[1] + 1, incidents[FRAUD_RING])
    ring_sizes = ring_sizes[np.cumsum(ring_sizes) <= n_entities // 4]  # tiny populations: fewer rings
    n_normal = n_entities - int(ring_sizes.sum())
    profiles = {k: v[:n_normal] for k, v in profiles.items()}

    # Victims of card testing and takeover are distinct normal users.
    n_ct = min(incidents[CARD_TESTING], n_normal // 4)
    n_ato = min(incidents[ACCOUNT_TAKEOVER], n_normal // 4)
    victims = rng.permutation(n_normal)
    ct_victims, ato_victims = victims[:n_ct], victims[n_ct : n_ct + n_ato]

    takeover_at = np.full(n_normal, np.inf)
    takeover_at[ato_victims] = _fraud_start(rng, 0.2, 0.9, span, n_ato)
    _normal_rows(rng, rows, profiles, span, devices, takeover_at)
    _card_testing_rows(rng, rows, profiles, ct_victims, span, devices)
    _takeover_rows(rng, rows, profiles, ato_victims, takeover_at, span, devices)
    _ring_rows(rng, rows, ring_sizes, n_normal, span, devices)
    return _to_events(rng, rows.concat(), profiles, n_entities, span, seed)


def _normal_profiles(rng: np.random.Generator, n: int, devices: _Devices) -> dict[str, np.ndarray]:
    """Per-user habits: rate, amounts, devices, home country, hour phase, favourite categories."""
    n_dev = rng.choice([1, 2, 3], n, p=[0.55, 0.33, 0.12])
    dev = devices.new(3 * n).reshape(n, 3)
    # A household shares a device: one slot is another user's main device (known to both).
    shared = np.flatnonzero(rng.random(n) < 0.05)
    if len(shared) and n > 1:
        slot = np.minimum(n_dev[shared], 2)
        dev[shared, slot] = dev[rng.integers(0, n, len(shared)), 0]
        n_dev[shared] = slot + 1
    prefs = rng.dirichlet(np.ones(len(CATEGORIES)), n) * 0.6 + CATEGORY_P * 0.4
    return {
        "rate": rng.lognormal(math.log(3.0), 0.8, n),  # sessions per day
        "mu": rng.normal(math.log(35.0), 0.7, n),  # log typical amount
        "sigma": rng.uniform(0.4, 0.9, n),
        "n_dev": n_dev,
        "dev": dev,
        "home": rng.choice(len(COUNTRIES), n, p=COUNTRY_P),
        "phase": rng.integers(-2, 3, n),  # early birds and night owls
        "cat_cw": np.cumsum(prefs, axis=1),
        "micro": rng.random(n) < 0.05,  # micro-payment users: gaming top-ups, transit taps
    }


def _expand_sessions(
    rng: np.random.Generator, start: np.ndarray, size: np.ndarray, gap_mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Event times of sessions (start, number of events, mean gap); returns (times, session index)."""
    sess = np.repeat(np.arange(len(start)), size)  # every size is >= 1
    gaps = rng.exponential(1.0, len(sess)) * gap_mean[sess]
    firsts = np.cumsum(size) - size
    gaps[firsts] = 0.0
    csum = np.cumsum(gaps)
    return start[sess] + csum - csum[firsts][sess], sess


def _normal_rows(
    rng: np.random.Generator,
    rows: _Rows,
    p: dict[str, np.ndarray],
    span: float,
    devices: _Devices,
    takeover_at: np.ndarray,
) -> None:
    n = len(p["rate"])
    n_sessions = rng.poisson(p["rate"] * span / DAY)
    su = np.repeat(np.arange(n), n_sessions)
    s = len(su)
    day = rng.integers(0, math.ceil(span / DAY), s)
    hour = (rng.choice(24, s, p=HOUR_P) + p["phase"][su]) % 24
    start = day * DAY + hour * 3600.0 + rng.random(s) * 3600.0
    burst = p["micro"][su] & (rng.random(s) < 0.25)
    size = np.where(burst, rng.integers(4, 16, s), rng.geometric(0.75, s))
    t, sess = _expand_sessions(rng, start, size, np.where(burst, 25.0, 150.0))
    user, in_burst = su[sess], burst[sess]
    # An account taken over stops producing the owner's events.
    keep = (t < span) & (t < takeover_at[user])
    t, user, in_burst = t[keep], user[keep], in_burst[keep]
    m = len(t)

    category = (rng.random(m)[:, None] > p["cat_cw"][user]).sum(axis=1).clip(0, len(CATEGORIES) - 1)
    burst_cats = np.array([_CAT["gaming"], _CAT["digital_goods"], _CAT["transport"]])
    category = np.where(in_burst, burst_cats[rng.integers(0, 3, m)], category)
    amount = np.exp(p["mu"][user] + p["sigma"][user] * rng.standard_normal(m)) * CATEGORY_SCALE[category]
    amount = np.where(rng.random(m) < 0.004, amount * rng.uniform(8, 30, m), amount)  # a big purchase
    amount = np.where(in_burst, rng.uniform(0.5, 5.0, m), amount)

    # Mostly the main device; a few users switch to a new phone mid-way.
    k = p["n_dev"][user]
    slot = np.where((rng.random(m) < 0.8) | (k == 1), 0, 1 + rng.integers(0, np.maximum(k - 1, 1)))
    device = p["dev"][user, slot]
    changers = rng.random(n) < 0.06
    change_at = np.where(changers, rng.uniform(0.1, 0.9, n) * span, np.inf)
    new_phone = devices.new(n)
    use_new = (t >= change_at[user]) & (rng.random(m) < 0.85)
    device = np.where(use_new, new_phone[user], device)

    # Home country, except on a trip abroad or behind a VPN.
    country = p["home"][user].copy()
    travellers = rng.random(n) < 0.04
    trip_start = rng.uniform(0, span, n)
    trip_end = trip_start + rng.uniform(1, 3, n) * DAY
    trip_country = (p["home"] + rng.integers(1, len(COUNTRIES), n)) % len(COUNTRIES)
    on_trip = travellers[user] & (t >= trip_start[user]) & (t < trip_end[user])
    country = np.where(on_trip, trip_country[user], country)
    vpn = rng.random(m) < 0.01
    country = np.where(vpn, rng.integers(0, len(COUNTRIES), m), country)
    rows.add(
        t=t,
        entity=user,
        amount=amount,
        device=device,
        country=country,
        category=category,
        label=0,
        scenario=NORMAL,
    )


def _fraud_start(rng: np.random.Generator, lo: float, hi: float, span: float, k: int = 1) -> np.ndarray:
    """Start times of `k` incidents: a day within [lo, hi] of the period, an hour from FRAUD_HOUR_P."""
    day = np.floor(rng.uniform(lo, hi, k) * span / DAY)
    hour = rng.choice(24, k, p=FRAUD_HOUR_P)
    return np.squeeze(day * DAY + hour * 3600.0 + rng.random(k) * 3600.0)


def _pick(rng: np.random.Generator, names: tuple[str, ...], p: list[float], k: int) -> np.ndarray:
    return np.array([_CAT[x] for x in names])[rng.choice(len(names), k, p=p)]


def _foreign_or_home(rng: np.random.Generator, home: int, p_foreign: float) -> int:
    if rng.random() < p_foreign:
        return int((home + rng.integers(1, len(COUNTRIES))) % len(COUNTRIES))
    return int(home)


def _card_testing_rows(
    rng: np.random.Generator,
    rows: _Rows,
    p: dict[str, np.ndarray],
    victims: np.ndarray,
    span: float,
    devices: _Devices,
) -> None:
    # Testers reuse their devices across stolen cards.
    pool = devices.new(max(2, len(victims) // 3))
    for v in victims:
        slow = rng.random() < 0.3
        n_small = int(rng.integers(3, 11) if slow else rng.integers(6, 36))
        n_big = 0 if rng.random() < 0.15 else int(rng.integers(1, 4))  # some lists are sold untested
        gap = rng.uniform(300, 1800) if slow else rng.uniform(5, 40)
        gaps = rng.exponential(gap, n_small + n_big)
        gaps[n_small:] = rng.exponential(1200.0 if slow else 120.0, n_big)
        t = _fraud_start(rng, 0.05, 0.9, span) + np.cumsum(gaps)
        amount = np.concatenate([rng.uniform(0.5, 3.0, n_small), rng.lognormal(math.log(400.0), 0.6, n_big)])
        category = np.concatenate(
            [
                _pick(rng, ("digital_goods", "gaming", "retail"), [0.6, 0.2, 0.2], n_small),
                _pick(rng, ("electronics", "gift_cards", "retail"), [0.5, 0.3, 0.2], n_big),
            ]
        )
        rows.add(
            t=t,
            entity=int(v),
            amount=amount,
            device=int(rng.choice(pool)),
            country=_foreign_or_home(rng, p["home"][v], 0.6),
            category=category,
            label=1,
            scenario=CARD_TESTING,
        )


def _takeover_rows(
    rng: np.random.Generator,
    rows: _Rows,
    p: dict[str, np.ndarray],
    victims: np.ndarray,
    takeover_at: np.ndarray,
    span: float,
    devices: _Devices,
) -> None:
    new_devices = devices.new(len(victims))
    for v, device in zip(victims, new_devices, strict=True):
        slow = rng.random() < 0.3
        n = int(rng.integers(2, 7) if slow else rng.integers(3, 11))
        gaps = rng.exponential(rng.uniform(3600, 4 * 3600) if slow else rng.uniform(60, 400), n)
        gaps[0] = 0.0
        t = takeover_at[v] + np.cumsum(gaps)
        typical = math.exp(p["mu"][v])
        amount = np.maximum(typical * rng.uniform(3, 15, n), rng.uniform(100, 250, n))
        category = _pick(
            rng, ("electronics", "gift_cards", "money_transfer", "travel"), [0.35, 0.25, 0.3, 0.1], n
        )
        rows.add(
            t=t,
            entity=int(v),
            amount=amount,
            device=int(device),
            country=_foreign_or_home(rng, p["home"][v], 0.8),
            category=category,
            label=1,
            scenario=ACCOUNT_TAKEOVER,
        )


def _ring_rows(
    rng: np.random.Generator,
    rows: _Rows,
    sizes: np.ndarray,
    first_entity: int,
    span: float,
    devices: _Devices,
) -> None:
    entity = first_entity
    for size in sizes:
        pool = devices.new(int(rng.integers(2, 5)))
        country = int(rng.choice(len(COUNTRIES), p=COUNTRY_P))
        slow = rng.random() < 0.3
        start = _fraud_start(rng, 0.0, 0.85, span)
        for _ in range(int(size)):
            n = int(rng.integers(3, 9) if slow else rng.integers(4, 16))
            gaps = rng.exponential(rng.uniform(2, 8) * 3600 if slow else rng.uniform(120, 600), n)
            t = start + rng.uniform(0, 7200) + np.cumsum(gaps)
            category = _pick(
                rng,
                ("electronics", "gift_cards", "money_transfer", "digital_goods"),
                [0.35, 0.25, 0.25, 0.15],
                n,
            )
            rows.add(
                t=t,
                entity=entity,
                amount=rng.lognormal(math.log(150.0), 0.5, n),
                device=pool[rng.integers(0, len(pool), n)],
                country=country,
                category=category,
                label=1,
                scenario=FRAUD_RING,
            )
            entity += 1


def _to_events(
    rng: np.random.Generator,
    r: dict[str, np.ndarray],
    p: dict[str, np.ndarray],
    n_entities: int,
    span: float,
    seed: int,
) -> LabelledEvents:
    """Clip to the period, sort by time, derive `is_new_device`, and build the `Event`s."""
    inside = r["t"] < span  # incidents starting late are cut at the end, as a real export would be
    r = {k: v[inside] for k, v in r.items()}
    t = np.round(BASE_EPOCH + r["t"], 3)
    order = np.lexsort((r["entity"], t))  # by time, ties by entity; lexsort is stable
    r = {k: v[order] for k, v in r.items()}
    t = t[order]

    # A device is new to an entity at its first use, unless it was a usual device before the data starts.
    pair = r["entity"].astype(np.int64) * (1 << 32) + r["device"]
    _, first = np.unique(pair, return_index=True)
    is_new = np.zeros(len(t), dtype=bool)
    is_new[first] = True
    n_normal = len(p["dev"])
    known = np.zeros(len(t), dtype=bool)
    normal = r["entity"] < n_normal
    ent = np.where(normal, r["entity"], 0)
    for slot in range(3):
        known |= normal & (slot < p["n_dev"][ent]) & (p["dev"][ent, slot] == r["device"])
    is_new &= ~known

    # Opaque ids: entity numbers are shuffled so an id says nothing about its scenario, and device
    # numbers go through an odd-multiplier hash mod 2^32, a bijection, so they stay unique.
    entity_names = np.array([f"u{i:06d}" for i in rng.permutation(n_entities)])[r["entity"]].tolist()
    device_names = [f"dev-{(d * 2_654_435_761 + 97) % (1 << 32):08x}" for d in r["device"].tolist()]
    countries = np.array(COUNTRIES)[r["country"]].tolist()
    categories = np.array(CATEGORIES)[r["category"]].tolist()
    amounts = np.maximum(np.round(r["amount"], 2), 0.01).tolist()
    events = EventColumnsBuilder()
    for i, (ts, new) in enumerate(zip(t.tolist(), is_new.tolist(), strict=True)):
        attributes = {
            "device_id": device_names[i],
            "country": countries[i],
            "merchant_category": categories[i],
            "is_new_device": new,
        }
        events.append(f"s{seed}-{i:07d}", entity_names[i], ts, "payment", amounts[i], attributes)
    return LabelledEvents(
        events=events.build(),
        labels=r["label"].astype(np.int8),
        scenarios=np.array(SCENARIOS)[r["scenario"]],
    )
