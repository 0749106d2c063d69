"""The restart policy on its own: exact backoffs, the budget per window, FAILED."""

from __future__ import annotations

from genmesh.launcher.restarts import Exit, RestartBudget, RestartPolicy


def test_backoff_doubles_per_restart_in_the_window_until_the_budget_is_spent():
    # 0.1 s, then 0.5 s doubling to 8 s, 5 restarts per 60 s
    budget = RestartBudget(RestartPolicy(max_restarts=6))
    restart_times = []
    now = 0.0
    for expected in (0.1, 0.5, 1.0, 2.0, 4.0, 8.0):
        assert budget.backoff_after_exit(now) == expected
        now += expected
        budget.record_restart(now)
        restart_times.append(now)
        now += 1.0  # it runs for a second, then exits again
    assert restart_times == [0.1, 1.6, 3.6, 6.6, 11.6, 20.6]
    assert budget.backoff_after_exit(now) is None  # a seventh exit within 60 s: FAILED
    assert budget.num_restarts == 6
    assert RestartPolicy().max_restarts == 5


def test_restarts_leave_the_window_after_window_s():
    budget = RestartBudget(RestartPolicy(max_restarts=2, window_s=10.0))
    budget.record_restart(1.0)
    budget.record_restart(4.0)
    assert budget.backoff_after_exit(10.9) is None  # both restarts inside (0.9, 10.9]
    assert budget.backoff_after_exit(11.0) == 0.5  # the one at 1.0 s has left the window
    assert budget.num_recent(14.0) == 0
    assert budget.backoff_after_exit(14.0) == 0.1  # a quiet window: the shortest again
    assert budget.num_restarts == 2  # the lifetime count never drops


def test_backoff_stops_doubling_at_max_backoff():
    budget = RestartBudget(RestartPolicy(first_backoff_s=0.0, initial_backoff_s=1.0,
                                         max_backoff_s=3.0, max_restarts=10))
    backoffs = []
    for i in range(5):
        backoff = budget.backoff_after_exit(float(i))
        assert backoff is not None
        backoffs.append(backoff)
        budget.record_restart(float(i))
    assert backoffs == [0.0, 1.0, 2.0, 3.0, 3.0]


def test_an_exit_says_how_the_process_ended():
    assert Exit(-9, 0.0).describe() == "killed by SIGKILL"
    assert Exit(-9, 0.0).signal_name == "SIGKILL"
    assert Exit(3, 0.0).describe() == "exit status 3"
    assert Exit(0, 0.0).signal_name is None
