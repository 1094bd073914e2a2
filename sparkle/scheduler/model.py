"""The cost model: per (device, op), a Bayesian log-linear regression of compute time on the call's
features, started from the device's profile and updated from every measured call; per (device, call
signature), a robust history of measured times.

Times are modelled in log space: errors are relative, and a slow outlier (another process, a page
fault) is one large residual that the Huber weights shrink instead of letting it drag a mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Residuals beyond this many standard deviations count with a weight that shrinks as they grow (Huber).
HUBER_LIMIT = 2.5
PRIOR_NOISE = 0.3  # log-space standard deviation of a call's time before anything is measured: +-35 %
MIN_NOISE = 0.03  # timings never agree better than 3 % on a shared machine
REGIME_STREAK = 4  # this many outliers in a row on one side are a new regime, not noise
REGRESSOR_NAMES = ("intercept", "log m", "log n", "log k", "thin groups", "float64")


def huber_weight(residual, scale):
    """1 inside HUBER_LIMIT standard deviations, shrinking as 1/|r| beyond."""
    limit = HUBER_LIMIT * scale
    return 1.0 if abs(residual) <= limit else limit / abs(residual)


@dataclass
class LogLinearModel:
    """ln(seconds) = theta . phi + noise, with a Gaussian prior on theta (mean, covariance)."""

    mean: np.ndarray
    covariance: np.ndarray
    noise: float = PRIOR_NOISE  # robust estimate of the residual standard deviation
    updates: int = 0

    @classmethod
    def from_rate(cls, flops_per_second):
        """Prior: compute time = flops / rate (2 m n k flops), float64 twice and thin groups 1.5x slower.
        The intercept's standard deviation is 0.5 (a factor 1.6: the profile measured one GEMM on this very
        device), the exponents' 0.2; the first measured calls of a device move them quickly."""
        mean = np.array([math.log(2.0 / flops_per_second), 1.0, 1.0, 1.0, math.log(1.5), math.log(2.0)])
        covariance = np.diag([0.25, 0.04, 0.04, 0.04, 0.5, 0.25])
        return cls(mean, covariance)

    def predict(self, regressors):
        """(mean, variance) of ln(seconds) for one call's regressors."""
        phi = np.asarray(regressors)
        return float(phi @ self.mean), float(phi @ self.covariance @ phi) + self.noise ** 2

    def update(self, regressors, log_seconds, count=1):
        """One recursive least-squares step for ``count`` calls of one signature whose mean ln(seconds) is
        ``log_seconds`` (repeats are not independent evidence: callers cap ``count``); outliers are
        down-weighted. Returns the weight given."""
        phi = np.asarray(regressors)
        mu, variance = self.predict(phi)
        residual = log_seconds - mu
        weight = huber_weight(residual, math.sqrt(variance))
        noise_variance = self.noise ** 2 / (weight * count)
        gain = self.covariance @ phi / (phi @ self.covariance @ phi + noise_variance)
        self.mean = self.mean + gain * residual
        self.covariance = self.covariance - np.outer(gain, phi @ self.covariance)
        # The noise estimate follows the clipped squared residuals (slowly once many calls were seen).
        rate = max(0.02, 1.0 / (self.updates + 2))
        clipped = min(residual ** 2, (HUBER_LIMIT * self.noise) ** 2)
        self.noise = max(MIN_NOISE, math.sqrt((1 - rate) * self.noise ** 2 + rate * clipped))
        self.updates += 1
        return weight

    def to_json(self):
        return {"mean": self.mean.tolist(), "covariance": self.covariance.tolist(), "noise": self.noise,
                "updates": self.updates}

    @classmethod
    def from_json(cls, data):
        mean, covariance = np.array(data["mean"], float), np.array(data["covariance"], float)
        if mean.shape != (len(REGRESSOR_NAMES),) or covariance.shape != (len(REGRESSOR_NAMES),) * 2:
            raise ValueError("model of another layout")
        return cls(mean, covariance, float(data["noise"]), int(data["updates"]))


@dataclass(slots=True)
class History:
    """Measured times of one call signature on one device: count, robust mean and spread of ln(seconds).

    Updated on the hot path (about 1 us): plain floats, no function calls but one square root."""

    count: int = 0
    mean: float = 0.0
    spread: float = PRIOR_NOISE
    outliers: int = 0
    streak: int = 0  # consecutive outliers on the same side: +n slower, -n faster

    def add(self, log_seconds):
        """Add one measured call; True when the times changed regime (REGIME_STREAK outliers in a row on one
        side: the device slowed down or sped up), after which the history restarts from the new level."""
        count = self.count
        if count == 0:
            self.count, self.mean = 1, log_seconds
            return False
        residual = log_seconds - self.mean
        size = residual if residual >= 0.0 else -residual
        limit = HUBER_LIMIT * self.spread
        weight = 1.0
        if count >= 3 and size > limit:  # an outlier: Huber weight, and a streak on its side
            weight = limit / size
            self.outliers += 1
            side = 1 if residual > 0 else -1
            streak = self.streak + side if self.streak * side > 0 else side
            if streak >= REGIME_STREAK or streak <= -REGIME_STREAK:
                self.count, self.mean, self.spread, self.streak = 1, log_seconds, PRIOR_NOISE, 0
                return True
            self.streak = streak
        else:
            self.streak = 0
        count += 1
        self.count = count
        rate = weight / count if count < 20 else weight * 0.05  # a moving window: recent calls count most
        self.mean += rate * residual
        square = residual * residual if size <= limit else limit * limit
        spread = math.sqrt((1.0 - rate) * self.spread * self.spread + rate * square)
        self.spread = spread if spread > MIN_NOISE else MIN_NOISE
        return False

    def to_json(self):
        return [self.count, self.mean, self.spread, self.outliers]

    @classmethod
    def from_json(cls, data):
        count, mean, spread, outliers = data
        return cls(int(count), float(mean), float(spread), int(outliers))


@dataclass
class DeviceModel:
    """Everything learned about one device: a regression per op and the history of each signature."""

    regressions: dict = field(default_factory=dict)  # op -> LogLinearModel
    histories: dict = field(default_factory=dict)  # signature text -> History

    def to_json(self):
        return {"regressions": {op: model.to_json() for op, model in self.regressions.items()},
                "histories": {key: history.to_json() for key, history in self.histories.items()}}

    @classmethod
    def from_json(cls, data):
        return cls({op: LogLinearModel.from_json(m) for op, m in data["regressions"].items()},
                   {key: History.from_json(h) for key, h in data["histories"].items()})
