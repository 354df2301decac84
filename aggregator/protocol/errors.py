"""How a round ends without a model."""


class RoundFailed(RuntimeError):
    """A round could not produce a model (below quorum, a collective failure); nothing was registered."""
