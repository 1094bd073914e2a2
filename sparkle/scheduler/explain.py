"""What the scheduler decided and why: a decision object that prints as a short report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prediction:
    """One device's predicted time for a call, broken down, with its uncertainty."""

    device: str
    seconds: float
    transfer: float
    compute: float
    overhead: float
    compile: float
    spread: float  # standard deviation of ln(seconds): 0.1 is about +-10 %
    measured_calls: int  # calls of this signature measured on the device
    verified: bool  # the kernel variant that would run passed run-time verification for this shape class
    usable: bool = True
    note: str = ""  # why it is not usable (quarantined variant, recent faults, no profile yet), or what it waits for


@dataclass(frozen=True)
class Decision:
    op: str
    shape: str
    device: str | None  # the single device, or None for a split
    split: tuple = ()  # ((device, fraction), ...) along ``split_axis``
    split_axis: str | None = None
    predictions: tuple = ()
    predicted_seconds: float = 0.0
    confidence: float = 1.0  # probability that the choice is the fastest, under the model's uncertainty
    verified: bool = False
    explored: bool = False  # a device tried to learn its speed, not the predicted best
    forced: bool = False  # SPARKLE_DEVICE
    reason: str = ""

    @property
    def devices(self):
        return tuple(device for device, _ in self.split) if self.split else (self.device,)

    def summary(self):
        """One line: the op, the shape, the choice and the reason."""
        return f"{self.op} {self.shape} -> {self.choice()}: {self.reason}"

    def choice(self):
        if self.split:
            parts = " + ".join(f"{device} {fraction:.0%}" for device, fraction in self.split)
            return f"split by {self.split_axis}: {parts}"
        return self.device

    def __str__(self):
        lines = [self.summary(),
                 (f"  predicted {_ms(self.predicted_seconds)}, confidence {self.confidence:.0%}, "
                  f"{'verified' if self.verified else 'not yet verified (checked on this call)'}"),
                 (f"  {'device':<12} {'total':>10} {'transfer':>10} {'compute':>10} {'overhead':>10} "
                  f"{'compile':>10} {'+-':>5} {'seen':>5}  note")]
        for p in sorted(self.predictions, key=lambda p: (not p.usable, p.seconds)):
            note = p.note or ("verified" if p.verified else "")
            lines.append(f"  {p.device:<12} {_ms(p.seconds):>10} {_ms(p.transfer):>10} {_ms(p.compute):>10} "
                         f"{_ms(p.overhead):>10} {_ms(p.compile):>10} {p.spread:>5.0%} {p.measured_calls:>5}  {note}")
        return "\n".join(lines)


def _ms(seconds):
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"
