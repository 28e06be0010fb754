"""Waiting in tests for something to happen, never for a fixed time.

until() checks its condition every few milliseconds and returns as soon as it
holds. Its bound is generous (a loaded 2-core CI machine is slow): reaching it
means the event never came, and the test fails saying which.
"""

import time

PATIENCE = 60.0  # seconds


def until(condition, what: str, timeout: float = PATIENCE, interval: float = 0.01):
    """Return condition()'s first true value; fail after `timeout` s naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)
