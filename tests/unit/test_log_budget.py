"""gateway/limits.py LogBudget: a hostile client cannot flood the log through asyncua's records."""

from __future__ import annotations

import logging

from gateway.limits import LogBudget, bound_logs


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _logger(name: str, budget: LogBudget) -> tuple[logging.Logger, list[logging.LogRecord]]:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger.handlers = [handler]
    bound_logs(budget, (name,))
    return logger, seen


def test_each_call_site_passes_its_burst_then_the_next_window_says_how_many_were_dropped():
    clock = _Clock()
    budget = LogBudget(burst=5, window_s=60.0, clock=clock)
    logger, seen = _logger("test.logbudget.a", budget)

    def header(i: int) -> None:
        logger.error("malformed header %d from %s", i, "peer")  # one call site

    for i in range(1000):
        header(i)
        logger.error("other fault")  # another
    assert len(seen) == 10 and budget.suppressed == 1990
    assert [r.getMessage() for r in seen[:2]] == ["malformed header 0 from peer", "other fault"]
    clock.t = 61.0
    header(7)
    logger.info("below WARNING: never counted")
    assert seen[-2].getMessage() == "malformed header 7 from peer [995 similar records suppressed in the last 61 s]"
    assert seen[-1].getMessage() == "below WARNING: never counted"
    for _ in range(10):
        header(8)
    assert len(seen) == 12 + 4  # the new window's burst: 5 in all, the first was the summary


def test_bound_logs_is_idempotent_and_keeps_filters_already_there():
    budget = LogBudget()
    first = logging.Filter()
    logger = logging.getLogger("test.logbudget.b")
    logger.addFilter(first)
    bound_logs(budget, ("test.logbudget.b",))
    bound_logs(budget, ("test.logbudget.b",))
    assert logger.filters == [first, budget]
