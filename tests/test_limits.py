"""broker.limits.AdmissionControl: throttling, fair waiting rooms, rotation and penalties.

Pure bookkeeping with a fake clock and a seeded random source. Waiting connections and admitted
SSH server objects are small stand-ins for the two protocols the module defines (``Waiting``:
a bare socket that can be peeked at and closed; ``Admitted``: something with a ``progress`` that
can be evicted) — the real ones (broker/acceptor.py, broker/ssh_server.py) are exercised over
real sockets in tests/test_hostile.py and tests/test_fair_admission.py.
"""

from __future__ import annotations

import random

import pytest

from broker.limits import PROGRESS_AUTH, PROGRESS_KEY, AdmissionControl, classify_first_bytes


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Conn:
    """A waiting connection: *state* is what its client has sent so far."""

    def __init__(self, state: str = "silent"):
        self.state = state
        self.closed: bool | None = None  # None: open; else the `refused` flag it was closed with

    def probe(self) -> str:
        return "gone" if self.closed is not None else self.state

    def close(self, refused: bool = True) -> None:
        self.closed = refused


class Server:
    """An admitted connection's SSH server object."""

    def __init__(self, progress: int = 0):
        self.progress = progress
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


def control(**kw) -> tuple[AdmissionControl, Clock]:
    clock = Clock()
    kw.setdefault("rng", random.Random(1))
    return AdmissionControl(clock=clock, **kw), clock


def admit(ac: AdmissionControl, source: str, n: int = 1) -> list[Server]:
    """n connections admitted at once from an open source, each with its server object attached."""
    servers = []
    for _ in range(n):
        assert ac.arrive(source, Conn())[0] == "admit"
        servers.append(Server())
        ac.attach(source, servers[-1])
    return servers


def test_first_bytes_are_classified():
    assert classify_first_bytes(None) == "silent"
    assert classify_first_bytes(b"") == "gone"
    for ok in (b"S", b"SSH-", b"SSH-2.0-AsyncSSH_2.14", b"SSH-1.99-x"):
        assert classify_first_bytes(ok) == "identified"
    for bad in (b"GET / HTTP/1.1", b"\0\0\0", b"SSH-1.5-old", b"ssh-2.0-"):
        assert classify_first_bytes(bad) == "garbage"


def test_open_source_is_admitted_at_once_and_waits_at_its_cap():
    ac, _ = control(max_preauth_per_source=2, max_preauth_total=10)
    admit(ac, "10.0.0.1", 2)
    verdict, why = ac.arrive("10.0.0.1", Conn())
    assert verdict == "wait" and "cap of 2" in why  # throttled, not refused
    assert ac.arrive("10.0.0.2", Conn())[0] == "admit"  # other sources unaffected
    assert ac.stats() == {
        "preauth": 4,
        "waiting": 1,
        "refused": 0,
        "throttled": 1,
        "evicted": 0,
        "penalties": 0,
        "penalised_sources": 0,
    }


def test_throttled_source_gets_about_one_admission_per_interval_with_jitter():
    ac, clock = control(
        max_preauth_per_source=0, max_waiting_per_source=500, penalty_threshold=1, penalty_base=1000, max_wait=1000
    )
    ac.auth_failed("10.0.0.9")  # penalised (for the whole test): throttled below any cap
    for _ in range(200):
        assert ac.arrive("10.0.0.9", Conn("identified"))[0] == "wait"
    admitted_at: list[float] = []
    start = clock.t
    while clock.t - start < 60:
        admitted_at += [clock.t] * len(ac.due())
        clock.t += 0.01
    gaps = [b - a for a, b in zip(admitted_at, admitted_at[1:], strict=False)]
    assert 45 <= len(admitted_at) <= 75, len(admitted_at)  # about one per second
    assert all(0.49 <= g <= 1.52 for g in gaps), gaps  # never a burst, never a long gap
    assert len({round(g, 1) for g in gaps}) >= 5, "intervals are jittered"
    assert ac.waiting("10.0.0.9") == 200 - len(admitted_at)


def test_penalised_source_is_throttled_not_refused_and_penalties_double():
    ac, clock = control(penalty_threshold=3, penalty_window=60, penalty_base=10, penalty_max=25)
    assert not ac.auth_failed("10.0.0.9") and not ac.auth_failed("10.0.0.9")
    assert ac.auth_failed("10.0.0.9")
    verdict, why = ac.arrive("10.0.0.9", Conn("identified"))
    assert verdict == "wait" and "penalised" in why
    assert ac.arrive("10.0.0.8", Conn())[0] == "admit"  # other sources unaffected
    assert len(ac.due()) == 1  # the first throttled admission is not delayed
    assert ac.arrive("10.0.0.9", Conn("identified"))[0] == "wait"
    assert ac.due() == []  # the next one waits for the interval
    clock.t += 10.1  # penalty over, below the cap: open again
    assert len(ac.due()) == 1
    assert ac.arrive("10.0.0.9", Conn())[0] == "admit"
    for _ in range(3):
        ac.auth_failed("10.0.0.9")
    assert 19.9 < ac.penalty_left("10.0.0.9") <= 20
    clock.t += 20.1
    for _ in range(3):
        ac.auth_failed("10.0.0.9")
    assert ac.penalty_left("10.0.0.9") == 25  # capped at penalty_max


def test_failures_age_out_of_the_window():
    ac, clock = control(penalty_threshold=3, penalty_window=10)
    ac.auth_failed("10.0.0.9")
    ac.auth_failed("10.0.0.9")
    clock.t += 11
    assert not ac.auth_failed("10.0.0.9")
    assert ac.arrive("10.0.0.9", Conn())[0] == "admit"


def test_identified_connections_are_admitted_before_silent_ones():
    ac, clock = control(max_preauth_per_source=0, penalty_threshold=1)
    ac.auth_failed("10.0.0.9")
    silent = [Conn() for _ in range(5)]
    for c in silent:
        ac.arrive("10.0.0.9", c)
    clock.t += 0.001
    late = Conn()
    ac.arrive("10.0.0.9", late)
    late.state = "identified"  # its client sent its identification line after it was accepted
    assert ac.due() == [("10.0.0.9", late)]
    clock.t += 1.6
    assert ac.due() == [("10.0.0.9", silent[0])]  # then the oldest silent one


def test_full_waiting_room_evicts_the_oldest_silent_connection_and_refuses_when_all_identified():
    ac, _ = control(max_preauth_per_source=1, max_waiting_per_source=3)
    admit(ac, "10.0.0.9")
    room = [Conn(), Conn("identified"), Conn()]
    for c in room:
        assert ac.arrive("10.0.0.9", c)[0] == "wait"
    newcomer = Conn("identified")
    assert ac.arrive("10.0.0.9", newcomer)[0] == "wait"
    assert room[0].closed is True and room[2].closed is None  # the oldest silent one made room
    assert ac.arrive("10.0.0.9", Conn("identified"))[0] == "wait"  # room[2] evicted in turn
    assert room[2].closed is True
    verdict, why = ac.arrive("10.0.0.9", Conn("identified"))
    assert verdict == "refuse" and "all identified" in why
    assert ac.stats()["evicted"] == 2 and ac.stats()["refused"] == 3  # 2 evicted + 1 refused
    assert ac.waiting("10.0.0.9") == 3 and ac.preauth_total == 4


def test_departed_and_garbage_clients_leave_the_waiting_room_without_an_eviction():
    ac, _ = control(max_preauth_per_source=1, max_waiting_per_source=2)
    admit(ac, "10.0.0.9")
    assert ac.arrive("10.0.0.9", Conn("garbage"))[0] == "refuse"
    gone, junk = Conn(), Conn()
    ac.arrive("10.0.0.9", gone)
    ac.arrive("10.0.0.9", junk)
    gone.state, junk.state = "gone", "garbage"
    assert ac.arrive("10.0.0.9", Conn())[0] == "wait"  # the departed one made room
    assert gone.closed is False  # closed, not counted as refused
    assert ac.arrive("10.0.0.9", Conn())[0] == "wait"  # the garbage one made room
    assert junk.closed is True
    assert ac.stats()["evicted"] == 0


def test_throttled_admission_at_the_cap_rotates_out_the_least_progressed_oldest_slot():
    ac, clock = control(max_preauth_per_source=3)
    a, b, c = admit(ac, "10.0.0.9", 3)
    a.progress = PROGRESS_KEY  # offered the session's own key: evicted last
    b.progress = PROGRESS_AUTH
    first, second, third = Conn("identified"), Conn("identified"), Conn("identified")
    for w in (first, second, third):
        assert ac.arrive("10.0.0.9", w)[0] == "wait"
    assert ac.due() == [("10.0.0.9", first)]
    assert c.evicted and not (a.evicted or b.evicted)  # c: no progress
    ac.attach("10.0.0.9", Server())  # the admitted one's server object
    assert ac.due() == []  # one per interval
    clock.t += 1.6
    assert ac.due() == [("10.0.0.9", second)]
    assert not b.evicted  # the newly admitted one (no progress, newer) went first
    clock.t += 1.6
    ac.attach("10.0.0.9", Server(progress=PROGRESS_KEY))
    assert ac.due() == [("10.0.0.9", third)]
    assert b.evicted and not a.evicted
    assert ac.admitted("10.0.0.9") == 3 and ac.stats()["evicted"] == 3


def test_verified_connection_leaves_the_accounting_and_frees_its_slot_at_once():
    ac, _ = control(max_preauth_per_source=2)
    rooms = []
    ac.on_room = lambda: rooms.append(ac.preauth_total)
    a, b = admit(ac, "10.0.0.9", 2)
    waiting = Conn("identified")
    ac.arrive("10.0.0.9", waiting)
    assert ac.next_due() == 0  # throttled, but its first admission is not delayed
    assert len(ac.due()) == 1 and (a.evicted or b.evicted)
    ac.attach("10.0.0.9", Server())
    later = Conn("identified")
    ac.arrive("10.0.0.9", later)
    assert 0.5 <= ac.next_due() <= 1.5
    survivor = b if a.evicted else a
    ac.left_preauth("10.0.0.9", survivor)  # its credential verified
    assert rooms, "a freed slot of a source with waiting connections wakes the pump"
    assert ac.next_due() == 0 and ac.due() == [("10.0.0.9", later)]  # open again: no throttle wait
    assert not survivor.evicted


def test_waiting_longer_than_max_wait_closes_the_connection():
    ac, clock = control(max_preauth_per_source=0, penalty_threshold=1, throttle_interval=100, max_wait=5)
    ac.auth_failed("10.0.0.9")
    first, second, third = Conn(), Conn("identified"), Conn()
    ac.arrive("10.0.0.9", first)
    assert ac.due() == [("10.0.0.9", first)]
    ac.arrive("10.0.0.9", second)
    clock.t += 2
    ac.arrive("10.0.0.9", third)
    assert 2.9 <= ac.next_due() <= 3.0  # the oldest waiting one's deadline comes first
    clock.t += 3
    assert ac.due() == [] and second.closed is True and third.closed is None
    clock.t += 2
    ac.due()
    assert third.closed is True and ac.preauth_total == 1 and ac.next_due() is None


def test_exempt_networks_are_neither_penalised_nor_throttled():
    ac, _ = control(
        max_preauth_per_source=1, max_preauth_total=10, penalty_threshold=1, penalty_exempt=["192.168.0.0/16"]
    )
    assert not ac.auth_failed("192.168.1.5")
    assert ac.arrive("192.168.1.5", Conn())[0] == "admit" and ac.arrive("192.168.1.5", Conn())[0] == "admit"
    assert ac.auth_failed("10.1.1.1")


def test_no_waiting_room_refuses_throttled_sources_as_before():
    ac, _ = control(max_preauth_per_source=1, max_waiting_per_source=0, penalty_threshold=1)
    admit(ac, "10.0.0.1")
    verdict, why = ac.arrive("10.0.0.1", Conn())
    assert verdict == "refuse" and "cap of 1" in why
    ac.auth_failed("10.0.0.2")
    assert ac.arrive("10.0.0.2", Conn())[0] == "refuse"
    assert ac.stats()["refused"] == 2


def test_total_counts_waiting_connections_and_on_room_fires_when_it_drops():
    ac, _ = control(max_preauth_per_source=1, max_preauth_total=3)
    calls = []
    ac.on_room = lambda: calls.append(ac.preauth_total)
    admit(ac, "10.0.0.1")
    admit(ac, "10.0.0.2")
    ac.arrive("10.0.0.1", Conn())  # waits
    assert ac.preauth_total == 3 and ac.waiting_total == 1
    ac.left_preauth("10.0.0.2")
    assert calls == [2]
    ac.left_preauth("10.0.0.9")  # never admitted: no change, no call
    assert calls == [2]


def test_left_preauth_never_goes_negative():
    ac, _ = control()
    ac.left_preauth("10.0.0.1")
    assert ac.preauth_total == 0


def test_refusal_logging_is_rate_limited():
    ac, clock = control()
    assert ac.should_log("1.2.3.4") and not ac.should_log("1.2.3.4")
    clock.t += 10
    assert ac.should_log("1.2.3.4")


def test_close_waiting_closes_every_waiting_connection_uncounted():
    ac, _ = control(max_preauth_per_source=0, penalty_threshold=1)
    ac.auth_failed("10.0.0.1")
    conns = [Conn() for _ in range(3)]
    for c in conns:
        ac.arrive("10.0.0.1", c)
    ac.close_waiting()
    assert [c.closed for c in conns] == [False] * 3
    assert ac.preauth_total == 0 and ac.waiting_total == 0 and ac.next_due() is None


def test_throttle_interval_must_be_positive():
    with pytest.raises(ValueError):
        AdmissionControl(throttle_interval=0)
