"""The pending queue as the shared Slurm poller reads it: each job's position in its partition."""

from __future__ import annotations

from hub_plugin.slurm_poller import QUEUE_ARGS, parse_queue


def test_positions_count_per_partition_in_squeue_order():
    out = "41|gpu\n17|debug\n42|debug\n9|gpu\n\ngarbage\n43|debug\n"
    assert parse_queue(out) == {
        "41": (1, 2, "gpu"),
        "9": (2, 2, "gpu"),
        "17": (1, 3, "debug"),
        "42": (2, 3, "debug"),
        "43": (3, 3, "debug"),
    }
    assert parse_queue("") == {}


def test_the_queue_is_read_highest_priority_first():
    assert "--sort=-p,i" in QUEUE_ARGS and QUEUE_ARGS[QUEUE_ARGS.index("-t") + 1] == "PENDING"
