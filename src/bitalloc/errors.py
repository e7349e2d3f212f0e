"""One exception family, so the CLI can print the message and exit non-zero."""


class BitallocError(Exception):
    """A problem with the user's input; the message names it and the fix."""


class ModelNotFoundError(BitallocError):
    pass


class InfeasibleBudgetError(BitallocError):
    pass


class GroupSizeError(BitallocError):
    pass


class PlanMismatchError(BitallocError):
    pass


class BadWeightsError(BitallocError):
    pass
