"""Skipped program runs: the fdinfo field, and its absence on kernels without it."""

from ctrace.sources.prog_info import parse_recursion_misses

FDINFO_6_12 = """pos:\t0
flags:\t02000002
mnt_id:\t15
ino:\t2066
prog_type:\t26
prog_jited:\t1
prog_tag:\t5a1ac9c1f1d0e1a3
memlock:\t4096
prog_id:\t57
run_time_ns:\t0
run_cnt:\t0
recursion_misses:\t17
verified_insns:\t220
"""

FDINFO_5_10 = """pos:\t0
flags:\t02000002
mnt_id:\t15
prog_type:\t2
prog_jited:\t1
prog_tag:\t5a1ac9c1f1d0e1a3
memlock:\t4096
prog_id:\t57
run_time_ns:\t0
run_cnt:\t0
"""


def test_count_is_read():
    assert parse_recursion_misses(FDINFO_6_12) == 17


def test_kernel_without_the_field_says_none_not_zero():
    assert parse_recursion_misses(FDINFO_5_10) is None


def test_growth_of_skipped_runs_becomes_lost_records():
    """Each poll turns growth of the programs' skip counts into one LOST record (probe_skipped)."""
    from ctrace import abi
    from ctrace.sources.live import LiveSource

    class Stub(LiveSource):
        def __init__(self) -> None:  # no kernel: counters from the test
            self._lost_seen = [0] * 8
            self.skips = {"confirm_e": 0, "confirm_x": None}
            self.ring = [0] * 8

        def per_cpu_sum(self, name, n):
            return list(self.ring)

        def prog_skips(self):
            return dict(self.skips)

    src = Stub()
    assert len(src._lost_records()) == 0
    src.skips["confirm_e"] = 3
    src.ring[abi.LostCause.RINGBUF_FULL] = 2
    recs = src._lost_records()
    assert sorted((int(r["reason"]), int(r["value"])) for r in recs) == [
        (abi.LostCause.RINGBUF_FULL, 2), (abi.LostCause.PROBE_SKIPPED, 3)]
    src.skips["confirm_e"] = 4
    assert [(int(r["reason"]), int(r["value"])) for r in src._lost_records()] == [(abi.LostCause.PROBE_SKIPPED, 1)]
    assert src.lost_counts()[abi.LostCause.PROBE_SKIPPED] == 4
    # Skips after the last poll: counted now, but not in what was streamed (a trailer's figures)
    src.skips["confirm_e"] = 6
    lost, skips = src.streamed_losses()
    assert lost[abi.LostCause.PROBE_SKIPPED] == 4 and lost[abi.LostCause.RINGBUF_FULL] == 2
    assert skips == {"confirm_e": 4, "confirm_x": None}
    assert src.lost_counts()[abi.LostCause.PROBE_SKIPPED] == 6
