"""Privacy accounting with Google's ``dp-accounting`` (RDP of the Poisson-subsampled Gaussian).

Both kinds of DP in leanfed are compositions of the same event: a Gaussian mechanism with
noise multiplier z (noise std / L2 sensitivity), applied to a Poisson subsample of rate q,
repeated T times (Abadi et al. 2016; Mironov 2017 for RDP; Mironov, Talwar & Zhang 2019 for
the subsampled Gaussian). Record-level: q = expected batch / site examples, T = local steps
so far. Client-level: q = clients per round / all clients, T = rounds so far.

`SiteAccounting` is the ONE map from a record-level run's public settings and a site's
(example count, rounds trained) to that site's epsilon: the site reports it with it
(`client.dp_local.account_site`) and the server recomputes it with it
(`strategies.aggregation.site_epsilon`), so the two cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

__all__ = [
    "EPSILON_RTOL",
    "PrivacyError",
    "SiteAccounting",
    "adaptive_value_noise",
    "epsilon",
    "noise_multiplier_for",
]

# A site's reported epsilon may differ from the server's recomputation by this relative
# amount: client and server call the same function on the same numbers, so an honest site
# matches to the last bit on one platform; the slack covers float round-off across
# platforms (libm) and no more. Sites must run the run's accountant (same dp-accounting).
EPSILON_RTOL = 1e-6


class PrivacyError(ValueError):
    """A DP setting is out of range (noise, clip, sampling rate, delta)."""


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise PrivacyError(f"noise multiplier must be > 0 and finite, got {noise_multiplier}")
    if not 0.0 < sample_rate <= 1.0:
        raise PrivacyError(f"sampling rate must be in (0, 1], got {sample_rate}")
    if steps < 0:
        raise PrivacyError(f"steps must be >= 0, got {steps}")
    if not 0.0 < delta < 1.0:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")


@lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """epsilon(delta) after ``steps`` Poisson-subsampled Gaussian steps (RDP accountant).

    Cached (a pure function; ~80 ms a call): sites of equal size ask for the same value
    every round, and calibration re-asks it for every arm sharing (q, T, delta).
    """
    _check(noise_multiplier, sample_rate, steps, delta)
    if steps == 0:
        return 0.0
    # dp_accounting (and the scipy.signal it pulls in, ~0.7 s) loads on the first call only
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
    accountant.compose(dp_event.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, *, tol: float = 1e-3
) -> float:
    """Smallest noise multiplier (to ``tol``) whose epsilon after ``steps`` is <= the target."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyError(f"target epsilon must be > 0 and finite, got {target_epsilon}")
    lo, hi = 0.05, 1.0
    while epsilon(hi, sample_rate, steps, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise PrivacyError(f"epsilon {target_epsilon} is out of reach (noise > 1e4)")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if epsilon(mid, sample_rate, steps, delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def adaptive_value_noise(noise_multiplier: float, count_noise: float) -> float:
    """Noise multiplier of the VALUES when the clipped-count query also spends privacy.

    Andrew et al. 2021 (Thm. 1): releasing the mean with z_d and the unclipped count with
    std sigma_b costs like one Gaussian of z = (z_d^-2 + (2 sigma_b)^-2)^-1/2; so the values
    get z_d = (z^-2 - (2 sigma_b)^-2)^-1/2 to keep the overall multiplier at ``noise_multiplier``.
    """
    rest = noise_multiplier**-2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise PrivacyError(
            f"count noise {count_noise} is too small for noise multiplier {noise_multiplier}: "
            f"need count noise > {noise_multiplier / 2}"
        )
    return rest**-0.5


class RecordDPConfig(Protocol):
    """The run-config fields record-level accounting reads (`tasks.config.LeanfedConfig`)."""

    @property
    def privacy_noise_multiplier(self) -> float: ...
    @property
    def local_batch_size(self) -> int: ...
    @property
    def local_steps(self) -> int: ...
    @property
    def privacy_delta(self) -> float: ...


@dataclass(frozen=True)
class SiteAccounting:
    """Record-level DP of one site (Abadi et al. 2016): every round it trains, it takes
    ``local_steps`` DP-SGD steps, each on a Poisson sample of rate q = batch / N of its N
    examples with noise multiplier z; its epsilon(delta) composes all of them (RDP)."""

    noise_multiplier: float
    batch_size: int
    local_steps: int
    delta: float

    @classmethod
    def of(cls, cfg: RecordDPConfig) -> SiteAccounting:
        """The public accounting inputs the run config fixes."""
        return cls(
            cfg.privacy_noise_multiplier, cfg.local_batch_size, cfg.local_steps, cfg.privacy_delta
        )

    def sample_rate(self, num_examples: int) -> float:
        """q = expected batch / N (1 when the batch is the whole site)."""
        if num_examples < 1:
            raise PrivacyError(f"a site needs >= 1 example, got {num_examples}")
        return min(1.0, self.batch_size / num_examples)

    def steps(self, rounds: int) -> int:
        """DP-SGD steps a site takes in ``rounds`` rounds (T of the accountant)."""
        if rounds < 0:
            raise PrivacyError(f"rounds must be >= 0, got {rounds}")
        return rounds * self.local_steps

    def site_epsilon(self, num_examples: int, rounds: int) -> float:
        """epsilon(delta) of a site of ``num_examples`` after training in ``rounds`` rounds."""
        q = self.sample_rate(num_examples)
        return epsilon(self.noise_multiplier, q, self.steps(rounds), self.delta)

    def problem(self, reported: float, num_examples: int, rounds: int) -> str | None:
        """Why ``reported`` is not this site's epsilon (beyond `EPSILON_RTOL`), or None."""
        expected = self.site_epsilon(num_examples, rounds)
        if math.isclose(reported, expected, rel_tol=EPSILON_RTOL, abs_tol=1e-12):
            return None
        return (
            f"reported epsilon {reported:.6g} is not the accountant's {expected:.6g} for "
            f"{num_examples} examples over {rounds} rounds"
        )
