"""Privacy accounting: one ledger of subsampled Gaussian mechanisms composed in one Opacus accountant.

Every mechanism that reads private data is an entry ``(name, noise_multiplier, sample_rate, steps)``:
DP-SGD steps are entries named ``"dpsgd"`` (``step``); any other Poisson-subsampled Gaussian mechanism, e.g. the
DPQuant sensitivity estimator, is added with ``add_mechanism(name, ...)``. ``epsilon()`` composes all of them
in the chosen accountant (Opacus ``RDPAccountant`` or ``PRVAccountant``) at the ledger's delta;
``breakdown()`` reports each mechanism's epsilon on its own, for "estimator share" reporting (the shares do
not add up to the total: composition is sub-additive).

PRV reports the upper end of its error interval (a guarantee, as Opacus does); ``epsilon_bounds()`` gives the
whole (lower, estimate, upper) interval for ``eps_error`` (default 0.01).

>>> led = PrivacyLedger("rdp", delta=1e-5)
>>> led.step(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
>>> led.add_mechanism("estimator", noise_multiplier=5.0, sample_rate=0.05, steps=3)
>>> led.epsilon() > led.breakdown()["dpsgd"] > led.breakdown()["estimator"]
True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from dpquant_sim.errors import ConfigError, PrivacyBudgetExceeded

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
DPSGD = "dpsgd"
PRV_EPS_ERROR = 0.01


@dataclass(frozen=True)
class Mechanism:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism (noise std = sigma x sensitivity)."""

    name: str
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (isinstance(self.noise_multiplier, (int, float)) and self.noise_multiplier > 0
                and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"{self.name}.noise_multiplier", self.noise_multiplier, "a finite number > 0")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"{self.name}.sample_rate", self.sample_rate, "a number in (0, 1]")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"{self.name}.steps", self.steps, "an integer >= 1")


def _history(mechs: Iterable[Mechanism]) -> list[tuple[float, float, int]]:
    """Opacus history [(sigma, q, steps)], one entry per distinct (sigma, q) in first-seen order.

    Composition is commutative (RDP adds, PRV convolves), so merging every use of the same mechanism, not
    only neighbours, is exact; it keeps the cost of an epsilon query independent of how many epochs
    interleave DP-SGD with the dpquant estimator.
    """
    steps: dict[tuple[float, float], int] = {}
    for m in mechs:
        key = (float(m.noise_multiplier), float(m.sample_rate))
        steps[key] = steps.get(key, 0) + int(m.steps)
    return [(s, q, t) for (s, q), t in steps.items()]


def _make_accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


def compose_epsilon(mechs: Sequence[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of ``mechs`` (0.0 when empty)."""
    hist = _history(mechs)
    if not hist:
        return 0.0
    acc = _make_accountant(accountant)
    acc.history = hist
    # q = 1 makes opacus's PRV take log(0) on a masked branch; RDP warns when the best order is the largest
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        if accountant == "prv":
            return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
        return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """All private-data mechanisms of one run, composed in one accountant.

    Args:
        accountant: "rdp" (Renyi DP, Opacus's default orders) or "prv" (numerical PRV composition, Gopi et al.).
        delta: the delta at which epsilon is reported, 0 < delta < 1.
    """

    def __init__(self, accountant: str = "rdp", delta: float = 1e-5):
        if accountant not in ACCOUNTANTS:
            raise ConfigError("accountant", accountant, ACCOUNTANTS)
        if not 0.0 < delta < 1.0:
            raise ConfigError("delta", delta, "a number in (0, 1)")
        self.accountant = accountant
        self.delta = float(delta)
        self.entries: list[Mechanism] = []
        self._cache: dict[tuple, float] = {}

    # -- recording
    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` DP-SGD (or DP-Adam) steps."""
        self.add_mechanism(DPSGD, noise_multiplier, sample_rate, steps)

    def add_mechanism(self, name: str, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` uses of a Poisson-subsampled Gaussian mechanism called ``name`` (sensitivity-
        normalised: noise std = noise_multiplier x L2 sensitivity; sample_rate 1 for no subsampling)."""
        m = Mechanism(str(name), float(noise_multiplier), float(sample_rate), int(steps))
        last = self.entries[-1] if self.entries else None
        if last and (last.name, last.noise_multiplier, last.sample_rate) == (m.name, m.noise_multiplier, m.sample_rate):
            self.entries[-1] = Mechanism(m.name, m.noise_multiplier, m.sample_rate, last.steps + m.steps)
        else:
            self.entries.append(m)

    # -- reporting
    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The composed Opacus history [(noise_multiplier, sample_rate, steps)]."""
        return _history(self.entries)

    def _eps(self, mechs: Sequence[Mechanism], delta: float) -> float:
        key = (tuple(_history(mechs)), delta)
        if key not in self._cache:
            self._cache[key] = compose_epsilon(mechs, delta, self.accountant)
        return self._cache[key]

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the ledger's), all mechanisms composed."""
        return self._eps(self.entries, self.delta if delta is None else delta)

    def projected_epsilon(self, extra: Iterable[Mechanism | tuple]) -> float:
        """Epsilon if ``extra`` mechanisms ((name, sigma, q, steps) tuples or Mechanism) were also run."""
        more = [m if isinstance(m, Mechanism) else Mechanism(*m) for m in extra]
        return self._eps(list(self.entries) + more, self.delta)

    def epsilon_bounds(self, delta: float | None = None) -> tuple[float, float, float]:
        """(lower, estimate, upper) epsilon; for RDP all three are the RDP bound (an upper bound)."""
        delta = self.delta if delta is None else delta
        if self.accountant == "rdp" or not self.entries:
            e = self.epsilon(delta)
            return e, e, e
        acc = _make_accountant("prv")
        acc.history = self.history
        delta_error = delta / 1000
        with np.errstate(divide="ignore", invalid="ignore"):
            dprv = acc._get_dprv(eps_error=PRV_EPS_ERROR, delta_error=delta_error)
            lo, est, hi = dprv.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)
        return float(lo), float(est), float(hi)

    def steps_of(self, name: str = DPSGD) -> int:
        return sum(m.steps for m in self.entries if m.name == name)

    def breakdown(self) -> dict[str, float]:
        """Each mechanism name's own epsilon at the ledger's delta (as if it were the only one)."""
        names = list(dict.fromkeys(m.name for m in self.entries))
        return {n: self._eps([m for m in self.entries if m.name == n], self.delta) for n in names}

    # -- persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain numbers/strings/lists (loadable with torch.load(weights_only=True))."""
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "entries": [[m.name, m.noise_multiplier, m.sample_rate, m.steps] for m in self.entries],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("accountant") != self.accountant or float(state.get("delta", -1)) != self.delta:
            raise ConfigError("ledger state", f"{state.get('accountant')}@{state.get('delta')}",
                              f"{self.accountant}@{self.delta} (the accountant and delta of this run)")
        self.entries = [Mechanism(str(n), float(s), float(q), int(t)) for n, s, q, t in state["entries"]]
        self._cache.clear()

    def __repr__(self) -> str:
        return f"PrivacyLedger({self.accountant!r}, delta={self.delta}, entries={len(self.entries)})"


def noise_for_target(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    extra_mechanisms: Sequence[Mechanism | tuple] = (),
    *,
    tolerance: float = 0.01,
) -> float:
    """Smallest DP-SGD noise multiplier (to ``tolerance`` in epsilon) such that ``steps`` DP-SGD steps at
    ``sample_rate``, composed with ``extra_mechanisms`` ((name, sigma, q, steps) tuples, e.g. a schedule's
    planned estimator), spend at most ``epsilon`` at ``delta`` in ``accountant``.

    Bisection on sigma like Opacus's ``get_noise_multiplier``, with the extra mechanisms in the composition.
    Raises PrivacyBudgetExceeded when the extra mechanisms alone already spend ``epsilon``.

    >>> s = noise_for_target(8.0, 1e-5, 0.1, 100)
    >>> 0.5 < s < 1.5
    True
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError("epsilon", epsilon, "a finite number > 0")
    if accountant not in ACCOUNTANTS:
        raise ConfigError("accountant", accountant, ACCOUNTANTS)
    extra = [m if isinstance(m, Mechanism) else Mechanism(*m) for m in extra_mechanisms]
    if extra:
        e0 = compose_epsilon(extra, delta, accountant)
        if e0 >= epsilon:
            raise PrivacyBudgetExceeded(
                f"the schedule's extra mechanisms alone spend epsilon={e0:.3f} >= target {epsilon}; "
                "raise the target or the estimator's noise multiplier")

    return calibrate_noise(
        epsilon, delta, accountant,
        lambda sigma: [Mechanism(DPSGD, sigma, sample_rate, steps)] + extra, tolerance=tolerance)


def calibrate_noise(
    epsilon: float,
    delta: float,
    accountant: str,
    build: "Callable[[float], Sequence[Mechanism]]",
    *,
    tolerance: float = 0.01,
) -> float:
    """Smallest sigma (bisection, to ``tolerance`` in epsilon) with ``compose_epsilon(build(sigma)) <= epsilon``.

    ``build(sigma)`` returns the whole planned sequence of mechanisms for a DP-SGD noise multiplier sigma, in
    the order the run will record them (the engine interleaves a schedule's planned estimator runs with the
    epochs), so the calibrated run's ledger reports exactly the epsilon computed here.
    """

    def eps(sigma: float) -> float:
        return compose_epsilon(list(build(sigma)), delta, accountant)

    # 1) bracket cheaply with integer RDP orders only: an upper bound on epsilon, so its sigma is >= ours
    def eps_proxy(sigma: float) -> float:
        return _rdp_integer_orders_epsilon(list(build(sigma)), delta)

    lo, hi = 0.0, 1.0
    while eps_proxy(hi) > epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            floor = eps(1e6)
            raise PrivacyBudgetExceeded(
                f"no DP-SGD noise multiplier reaches epsilon={epsilon} at delta={delta}: the other planned "
                f"mechanisms (e.g. the schedule's estimator) alone spend about {floor:.3f}; raise epsilon or "
                "their noise multiplier")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if hi - lo <= 1e-4 * hi:
            break
        if eps_proxy(mid) <= epsilon:
            hi = mid
        else:
            lo = mid
    # 2) refine with the real accountant: [a, b] with eps(a) > epsilon >= eps(b), Illinois false position
    b = hi
    e_b = eps(b)
    while e_b > epsilon:  # cannot happen for RDP (the proxy is an upper bound); PRV is tighter still
        b *= 1.25
        e_b = eps(b)
    a = 0.7 * b
    e_a = eps(a)
    while e_a <= epsilon:
        b, e_b = a, e_a
        a *= 0.7
        e_a = eps(a)
    side = 0
    for _ in range(40):
        if epsilon - e_b <= tolerance or b - a <= 1e-6:
            break
        fa, fb = e_a - epsilon, e_b - epsilon
        c = b - fb * (b - a) / (fb - fa)
        if not a < c < b:
            c = 0.5 * (a + b)
        e_c = eps(c)
        if e_c <= epsilon:
            b, e_b = c, e_c
            if side == -1:
                e_a = epsilon + 0.5 * (e_a - epsilon)
            side = -1
        else:
            a, e_a = c, e_c
            if side == 1:
                e_b = epsilon + 0.5 * (e_b - epsilon)
            side = 1
    # e_b may have been halved by the Illinois step; the returned sigma is the one with a real eps <= target
    return b


def _rdp_integer_orders_epsilon(mechs: Sequence[Mechanism], delta: float) -> float:
    """RDP epsilon using integer orders 2..255 only (fast closed-form log-A); an upper bound on the full one
    for the same orders subset, used only to bracket the calibration."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = list(range(2, 64)) + [80, 128, 256]
    hist = _history(mechs)
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=t, orders=orders) for s, q, t in hist)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        e, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(e)
