"""The error a user's data can cause: raised on the driver, before any worker starts."""


class DataError(ValueError):
    """A dataset problem, with the dataset's name and what to fix."""
