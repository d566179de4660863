"""Errors a training run ends with that the service reports by their own type (torch-free, so
the service can name them without importing the trainer)."""

from __future__ import annotations


class NonFiniteError(ArithmeticError):
    """A loss, log-prob or gradient became inf or NaN: the run stops before any weight takes it.
    `step` is the optimizer step it happened at (0: before training), `term` what went
    non-finite."""

    type = "non_finite"

    def __init__(self, step: int | None, term: str | None, message: str | None = None):
        self.step, self.term = step, term
        super().__init__(
            message
            or f"step {step}: {term} is not finite (inf or NaN); nothing was saved. Usual causes: a learning rate"
            " too high, or a beta so small that the loss overflows"
        )

    @classmethod
    def reported(cls, message: str) -> NonFiniteError:
        """The error a trainer subprocess reported (its message says the step and the term)."""
        return cls(None, None, message)
