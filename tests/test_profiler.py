"""The engine's profiler: it counts every op, forward and backward apart, and costs nothing off."""

import numpy as np
import pytest

from minimask.engine import Tensor, profile, profiler, section


def small_graph():
    x = Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    y = Tensor(np.ones((2, 3)), requires_grad=True)
    loss = (x * y + x).sum()
    loss.backward()
    return x


def test_counts_each_op_in_each_phase():
    with profile() as prof:
        small_graph()
    rows = {(r.name, r.phase): r.count for r in prof.rows.values()}
    assert rows[("Mul", "forward")] == 1 and rows[("Mul", "backward")] == 1
    assert rows[("Add", "forward")] == 1 and rows[("Sum", "backward")] == 1
    assert prof.wall >= prof.total() > 0
    summary = prof.summary()
    assert summary[-1].name == profiler.OUTSIDE
    assert sum(r.seconds for r in summary) == pytest.approx(prof.wall)


def test_off_records_nothing_and_gradients_are_unchanged():
    assert profiler.active is None
    plain = small_graph().grad
    with profile():
        profiled = small_graph().grad
    np.testing.assert_array_equal(plain, profiled)
    assert profiler.active is None


def test_sections_hold_only_their_own_time():
    with profile() as prof:
        with section("outer"):
            with section("inner"):
                small_graph()
    rows = {r.name: r for r in prof.rows.values()}
    assert rows["outer"].count == 1 and rows["inner"].count == 1
    ops = prof.total("forward") + prof.total("backward")
    assert ops + rows["outer"].seconds + rows["inner"].seconds <= prof.wall
    with section("nothing recorded"):  # no profile: a no-op
        pass


def test_profiles_do_not_nest_and_the_flag_is_cleared_after_an_error():
    with pytest.raises(RuntimeError, match="do not nest"):
        with profile():
            with profile():
                pass
    assert profiler.active is None


def test_table_names_ops_and_shares():
    with profile() as prof:
        small_graph()
    table = prof.table(top=2)
    assert "| Mul | forward | 1 |" in table or "more rows" in table
    assert "outside ops" in table and "%" in table
    # the header, two ops, the rest summed, outside ops
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 2 + 1 + 1


def test_cpu_clock_counts_work_not_waiting():
    import time  # noqa: PLC0415

    with profile(clock="cpu") as prof:
        with section("sleep"):
            time.sleep(0.2)  # waiting: no CPU time
        small_graph()
    assert prof.clock is profiler.CLOCKS["cpu"]
    assert prof.rows[("sleep", "section")].seconds < 0.1
    assert prof.table().startswith("CPU time")
    with profile() as wall:
        with section("sleep"):
            time.sleep(0.05)
    assert wall.rows[("sleep", "section")].seconds >= 0.05 and wall.table().startswith("wall")
    with pytest.raises(ValueError, match="clock"):
        with profile(clock="gpu"):
            pass
    assert profiler.active is None
