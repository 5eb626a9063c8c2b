"""broker.limits.AdmissionControl: pre-auth caps and per-source penalties (pure, fake clock)."""

from __future__ import annotations

from broker.limits import AdmissionControl


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_per_source_and_total_caps():
    ac = AdmissionControl(max_preauth_per_source=2, max_preauth_total=3, clock=Clock())
    assert ac.admit("10.0.0.1") is None
    assert ac.admit("10.0.0.1") is None
    assert "this source" in ac.admit("10.0.0.1")
    assert ac.admit("10.0.0.2") is None
    assert "in total" in ac.admit("10.0.0.3")
    ac.left_preauth("10.0.0.1")
    assert ac.admit("10.0.0.3") is None
    assert ac.stats()["refused"] == 2 and ac.preauth_total == 3


def test_left_preauth_never_goes_negative():
    ac = AdmissionControl(clock=Clock())
    ac.left_preauth("10.0.0.1")
    assert ac.preauth_total == 0


def test_penalty_after_threshold_and_doubling_up_to_max():
    clock = Clock()
    ac = AdmissionControl(penalty_threshold=3, penalty_window=60, penalty_base=10, penalty_max=25, clock=clock)
    assert not ac.auth_failed("10.0.0.9") and not ac.auth_failed("10.0.0.9")
    assert ac.auth_failed("10.0.0.9")
    assert "penalised" in ac.admit("10.0.0.9")
    assert ac.admit("10.0.0.8") is None  # other sources unaffected
    clock.t += 10.1
    assert ac.admit("10.0.0.9") is None
    for _ in range(3):
        ac.auth_failed("10.0.0.9")
    assert 19.9 < ac.penalty_left("10.0.0.9") <= 20
    clock.t += 20.1
    for _ in range(3):
        ac.auth_failed("10.0.0.9")
    assert ac.penalty_left("10.0.0.9") == 25  # capped at penalty_max


def test_failures_age_out_of_the_window():
    clock = Clock()
    ac = AdmissionControl(penalty_threshold=3, penalty_window=10, clock=clock)
    ac.auth_failed("10.0.0.9")
    ac.auth_failed("10.0.0.9")
    clock.t += 11
    assert not ac.auth_failed("10.0.0.9")
    assert ac.admit("10.0.0.9") is None


def test_exempt_networks_are_not_penalised_nor_capped_per_source():
    ac = AdmissionControl(max_preauth_per_source=1, max_preauth_total=10, penalty_threshold=1,
                          exempt=["192.168.0.0/16"], clock=Clock())
    assert not ac.auth_failed("192.168.1.5")
    assert ac.admit("192.168.1.5") is None and ac.admit("192.168.1.5") is None
    assert ac.auth_failed("10.1.1.1")


def test_refusal_logging_is_rate_limited():
    clock = Clock()
    ac = AdmissionControl(clock=clock)
    assert ac.should_log("1.2.3.4") and not ac.should_log("1.2.3.4")
    clock.t += 10
    assert ac.should_log("1.2.3.4")


def test_on_room_fires_when_the_total_drops_below_the_cap():
    ac = AdmissionControl(max_preauth_per_source=0, max_preauth_total=2, clock=Clock())
    calls = []
    ac.on_room = lambda: calls.append(ac.preauth_total)
    assert ac.admit("10.0.0.1") is None and ac.admit("10.0.0.2") is None
    assert calls == []
    ac.left_preauth("10.0.0.1")
    assert calls == [1]
    ac.left_preauth("10.0.0.9")  # never admitted: no change, no call
    assert calls == [1]
