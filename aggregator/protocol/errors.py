"""How a round ends without a model."""


class RoundFailed(RuntimeError):
    """A round could not produce a model (below quorum, a collective failure); nothing was registered."""


class PhaseRerun(RuntimeError):
    """An aggregator phase asks the driver to go back to the bank phase ``phase`` (a new attempt with the
    banks still answering, e.g. secure aggregation after a bank dropped out); bounded by the phase."""

    def __init__(self, phase: str, reason: str):
        super().__init__(f"re-run from {phase}: {reason}")
        self.phase, self.reason = phase, reason
