"""The swarm simulator at 1,000 peers (issue 11): the real scheduler core and download policy
bring every peer that stays to completion, with one copy of the blob from the origin.

Deterministic (fixed random seeds); ~11 s of CPU on the project's 2-core machine when nothing
else runs (~15 s before the policy's dispatch looked only at what changed).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import swarm_sim

# Completion against the lower bound, and the seed's upload in copies of the blob, that the swarm
# stays under at 1,000 peers: it measures 2.25x and 1.77 copies since the scheduler pushes new
# parents to the neediest children and finds parents to come by index (6.05x before; the policy
# before issue 11 took over 200x, its seed uploading 215 copies).
MAX_OVER_BOUND = 4.0
MAX_SEED_COPIES = 3.0


def test_a_thousand_peers_finish_with_one_origin_copy() -> None:
    args = swarm_sim.parse_args(["--peers", "1000", "--size-mib", "64", "--leave", "0.1"])
    started = time.process_time()  # CPU, not wall: other tests share the cores
    swarm = swarm_sim.Swarm(args)
    outcome = swarm.run()
    elapsed = time.process_time() - started
    stayed = args.peers - outcome.left
    assert outcome.left == 100
    assert len(outcome.completions) == stayed, f"{stayed - len(outcome.completions)} peers did not finish"
    assert outcome.failed == outcome.left  # nobody but the leavers failed
    assert outcome.origin_bytes <= 1.05 * swarm.size, outcome.origin_bytes / swarm.size
    assert max(outcome.completions) <= MAX_OVER_BOUND * swarm.lower_bound(), max(outcome.completions)
    assert outcome.seed_upload <= MAX_SEED_COPIES * swarm.size, outcome.seed_upload / swarm.size
    assert elapsed < 60, f"the simulation took {elapsed:.0f} CPU seconds"


@pytest.mark.parametrize(("seeds", "how"), [(1, "--fail-seed-at"), (2, "--fail-seed-at"), (1, "--kill-seed-at")])
def test_peers_finish_when_the_seed_dies_mid_download(seeds: int, how: str) -> None:
    # At 3 s the seed has the whole blob (2.7 s from the origin) but has passed some pieces to
    # nobody yet. It leaves (the scheduler deletes its host), or is killed (the scheduler only
    # sees its finished peer's stream end; children report it dead). The scheduler brings in
    # another seed (or, with none left, the peer that lacks the fewest pieces) for those pieces.
    # Before, every peer waited for pieces no parent would ever announce.
    args = swarm_sim.parse_args(["--peers", "200", "--size-mib", "64", "--leave", "0", "--seeds", str(seeds),
                                 how, "3", "--deadline", "600"])
    swarm = swarm_sim.Swarm(args)
    outcome = swarm.run()
    assert len(outcome.completions) == args.peers, f"{args.peers - len(outcome.completions)} peers did not finish"
    assert outcome.failed == 0
    # one more copy from the origin at most: the pieces are fetched once again, not once per peer
    assert swarm.size < outcome.origin_bytes <= 2.05 * swarm.size, outcome.origin_bytes / swarm.size


def test_a_shared_machine_cpu_bounds_the_swarm() -> None:
    """With the netns bench's machine modelled (2 cores, CPU-seconds per GiB moved), no run can
    beat moving every byte through that CPU; without it the same swarm finishes sooner than that."""
    common = ["--peers", "16", "--size-mib", "64", "--leave", "0"]
    cpu_bound_swarm = swarm_sim.Swarm(swarm_sim.parse_args([*common, "--cores", "2", "--cpu-per-gib", "12"]))
    free_cpu_swarm = swarm_sim.Swarm(swarm_sim.parse_args(common))
    with_cpu, free_cpu = cpu_bound_swarm.run(), free_cpu_swarm.run()
    assert len(with_cpu.completions) == len(free_cpu.completions) == 16
    moved_gib = (with_cpu.origin_bytes + with_cpu.seed_upload + sum(with_cpu.peer_uploads)) / swarm_sim.GIB
    cpu_floor = moved_gib * 12 / 2
    assert max(with_cpu.completions) >= cpu_floor, (max(with_cpu.completions), cpu_floor)
    assert max(free_cpu.completions) < cpu_floor, (max(free_cpu.completions), cpu_floor)
    assert with_cpu.origin_bytes <= 1.05 * cpu_bound_swarm.size
