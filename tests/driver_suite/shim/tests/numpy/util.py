"""``tests.numpy.util.check_numpy``: NumPy tests skip when NumPy is not installed."""

from functools import wraps
from unittest import SkipTest


def check_numpy(f):
    @wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except RuntimeError as e:
            if "NumPy" in str(e):
                raise SkipTest("NumPy is not installed") from e
            raise

    return wrapper
