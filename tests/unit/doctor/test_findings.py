"""Constructed root trees, each producing exactly the expected findings and numbers."""

import json

from doctor_helpers import finding, ids, report_of, run_cli
from doctor_tree import (
    IPT_EMPTY,
    NFT_STATEFUL,
    NFT_STATELESS,
    STAT_HEADER_510,
    Tree,
    ct_tcp,
    ct_udp,
)

QUIET = {"nf_conntrack_tcp_timeout_established": 7200}  # keeps established-timeout-long out of a test


def healthy(tree: Tree, count: int = 50, **base) -> Tree:
    """A server 10.0.0.1:443 with 50 live connections, every entry matched by a socket."""
    lines, socks = [], [("0.0.0.0", 443, "0.0.0.0", 0, "LISTEN")]
    for i in range(50):
        peer = f"10.0.1.{i + 1}"
        lines.append(ct_tcp(peer, "10.0.0.1", 40000 + i, 443, remaining=431999 - 10 * i))
        socks.append(("10.0.0.1", 443, peer, 40000 + i, "ESTABLISHED"))
    return (
        tree.base(count=count, **base)
        .stat([{}, {}])
        .local(["127.0.0.1", "10.0.0.1"])
        .sockets(socks)
        .table(lines)
        .ruleset(nft=NFT_STATEFUL, iptables=IPT_EMPTY, ip6tables=IPT_EMPTY)
    )


def test_healthy_default_machine_has_only_the_info_about_the_5_day_timeout(tree: Tree) -> None:
    r = report_of(healthy(tree).root)
    assert ids(r) == [("established-timeout-long", "info")]
    f = finding(r, "established-timeout-long")
    ev = f.evidence
    assert (ev["timeout_s"], ev["recommended_s"], ev["idle_sample"], ev["idle_p99_s"]) == (432000, 10800, 50, 491)
    assert ev["reclaimable_entries"] == 0 and r.missing == [] and r.status == "ok"
    assert ev["basis"] == "observed-idle-ages"
    assert run_cli(["doctor", "--root", str(tree.root)])[0] == 0


def test_no_findings_at_all(tree: Tree) -> None:
    r = report_of(healthy(tree, **QUIET).root)
    assert ids(r) == [] and r.status == "ok"
    rc, out, _ = run_cli(["doctor", "--root", str(tree.root)])
    assert rc == 0 and "No findings." in out and "10.0.0.1" in out


def test_table_near_full_critical_and_warning(tree: Tree) -> None:
    r = report_of(healthy(tree, count=950, max=1000, buckets=1000, **QUIET).root)
    assert ids(r) == [("table-near-full", "critical")]
    ev = finding(r, "table-near-full").evidence
    assert (ev["count"], ev["max"], ev["fill_percent"], ev["recommended_max"]) == (950, 1000, 95.0, 2048)
    assert ev["bytes_per_entry"] == 320 and ev["top_states"] == {"tcp ESTABLISHED": 50}
    assert "sysctl -w net.netfilter.nf_conntrack_max=2048" in finding(r, "table-near-full").recommendation.commands
    assert run_cli(["doctor", "--root", str(tree.root)])[0] == 21

    healthy(tree, count=800, max=1000, buckets=1000, **QUIET)
    r = report_of(tree.root)
    assert ids(r) == [("table-near-full", "warning")]
    assert run_cli(["doctor", "--root", str(tree.root)])[0] == 20

    healthy(tree, count=700, max=1000, buckets=1000, **QUIET)
    assert ids(report_of(tree.root)) == []


def test_hashsize_small_by_ratio_and_by_chaintoolong(tree: Tree) -> None:
    r = report_of(healthy(tree, max=1048576, buckets=16384, **QUIET).root)
    assert ids(r) == [("hashsize-small", "warning")]
    ev = finding(r, "hashsize-small").evidence
    assert (ev["buckets"], ev["max"], ev["max_per_bucket"], ev["recommended_buckets"]) == (16384, 1048576, 64.0, 1048576)
    assert ev["chaintoolong"] == 0

    healthy(tree, **QUIET).stat([{"chaintoolong": 5}, {}])
    r = report_of(tree.root)
    assert ids(r) == [("hashsize-small", "warning")]
    ev = finding(r, "hashsize-small").evidence
    assert (ev["chaintoolong"], ev["recommended_buckets"]) == (5, 524288)


def test_established_timeout_derived_from_observed_idle_ages(tree: Tree) -> None:
    # 200 forwarded connections idle 60..12000 s, one idle 300000 s
    lines = [ct_tcp(f"10.{k}.0.1", f"198.51.100.{k % 200 + 1}", 30000 + k, 1000 + k, remaining=432000 - 60 * k)
             for k in range(1, 201)]
    lines.append(ct_tcp("10.250.0.1", "198.51.100.1", 29999, 999, remaining=432000 - 300000))
    tree.base(count=201, max=400, buckets=400).stat([{}]).local(["10.0.0.1"]).sockets([]).table(lines)
    tree.ruleset(nft=NFT_STATEFUL)
    r = report_of(tree.root)
    assert ids(r) == [("established-timeout-long", "info")]  # half full, but 1 entry would be reclaimed
    f = finding(r, "established-timeout-long")
    ev = f.evidence
    assert (ev["idle_sample"], ev["idle_p99_s"], ev["recommended_s"], ev["reclaimable_entries"]) == (201, 11940, 25200, 1)
    assert ev["basis"] == "observed-idle-ages"
    assert "the p99 idle age of 201 ESTABLISHED entries (11,940 s) x 2" in f.detail
    assert "sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established=25200" in f.recommendation.commands
    assert "idle age = configured timeout - seconds left" in f.detail
    assert "entries already idle keep their old expiry" in f.recommendation.tradeoff


def test_statistics_insert_failed_early_drop_drop(tree: Tree) -> None:
    healthy(tree, **QUIET).stat([{"insert_failed": 3, "drop": 2, "clash_resolve": 4}, {"insert_failed": 1, "early_drop": 7}])
    r = report_of(tree.root)
    assert ids(r) == [("early-drop", "warning"), ("insert-failed", "warning"), ("packets-dropped", "warning")]
    ev = finding(r, "insert-failed").evidence
    assert (ev["insert_failed"], ev["per_cpu"], ev["clash_resolve"], ev["drop"]) == (4, [3, 1], 4, 2)
    assert finding(r, "early-drop").evidence["per_cpu"] == [0, 7]
    assert finding(r, "packets-dropped").evidence["drop"] == 2
    assert r.tables["stats"]["totals"]["early_drop"] == 7

    # while the table is at the limit, drops and evictions are happening now: critical
    healthy(tree, count=990, max=1000, buckets=1000, **QUIET).stat(
        [{"early_drop": 9, "drop": 1}], header=STAT_HEADER_510
    )
    r = report_of(tree.root)
    assert ids(r) == [("early-drop", "critical"), ("packets-dropped", "critical"), ("table-near-full", "critical")]
    assert "chaintoolong" not in r.tables["stats"]["totals"]


def test_statistics_from_conntrack_dash_s_when_procfs_has_none(tree: Tree) -> None:
    healthy(tree, **QUIET).remove("proc/net/stat/nf_conntrack")
    tree.write("conntrack/conntrack-S.txt",
               "cpu=0 found=0 invalid=0 insert=0 insert_failed=2 drop=0 early_drop=0 error=0 search_restart=0\n")
    r = report_of(tree.root)
    assert ids(r) == [("insert-failed", "warning")]
    assert r.missing == [] and any("conntrack -S" in n for n in r.notes)


def test_orphaned_established_lost_fin_rst(tree: Tree) -> None:
    lines, v4, v6 = [], [], []
    for k in range(5):  # live, dual-stack server socket: the kernel shows it in tcp6, v4-mapped
        lines.append(ct_tcp(f"10.0.2.{k + 1}", "10.0.0.1", 50000 + k, 443, remaining=432000 - 30))
        v6.append(("::ffff:10.0.0.1", 443, f"::ffff:10.0.2.{k + 1}", 50000 + k, "ESTABLISHED"))
    for k in range(40):  # the lost FIN/RST: no socket, idle 1000 s
        lines.append(ct_tcp("10.0.0.99", "10.0.0.1", 30000 + k, 443, remaining=431000))
    for k in range(3):  # opened while doctor read: too young to judge
        lines.append(ct_tcp("10.0.0.98", "10.0.0.1", 20000 + k, 443, remaining=431998))
    v6.append(("2001:db8::1", 39999, "2001:db8::99", 5432, "ESTABLISHED"))
    lines.append(ct_tcp("2001:db8::1", "2001:db8::99", 39999, 5432, remaining=432000 - 10))
    for k in range(12):  # client side, IPv6: this host connected out, the socket is gone
        lines.append(ct_tcp("2001:db8::1", "2001:db8::99", 40000 + k, 5432, remaining=427000))
    tree.base(count=len(lines)).stat([{}]).local(["10.0.0.1"], ["2001:db8::1"]).sockets(v4, v6).table(lines)
    tree.ruleset(nft=NFT_STATEFUL)
    r = report_of(tree.root)
    assert ids(r) == [("established-timeout-long", "info"), ("orphaned-established", "warning")]
    f = finding(r, "orphaned-established")
    ev = f.evidence
    assert ev["orphaned_total"] == 52
    a, b = ev["addresses"]
    assert (a["ip"], a["conntrack_established"], a["sockets_established"], a["orphaned"]) == ("10.0.0.1", 48, 5, 40)
    assert a["peers"] == [{"peer": "10.0.0.99", "orphaned": 40, "local_is": "server", "sockets_to_peer": 0}]
    assert (a["orphaned_idle_p50_s"], a["orphaned_idle_max_s"]) == (1000, 1000)
    assert (b["ip"], b["conntrack_established"], b["sockets_established"], b["orphaned"]) == ("2001:db8::1", 13, 1, 12)
    assert b["peers"] == [{"peer": "2001:db8::99", "orphaned": 12, "local_is": "client", "sockets_to_peer": 1}]
    assert f.recommendation.commands == ["conntrack -D -p tcp --state ESTABLISHED -r 10.0.0.1 -q 10.0.0.99"]
    assert "52 ESTABLISHED entries on 2 local addresses have no socket" in f.title
    assert "(3 such young entries.)" in f.detail
    per_ip = {row["ip"]: row for row in r.tables["per_ip"]}
    assert per_ip["10.0.0.1"]["sockets"] == {"ESTABLISHED": 5} and per_ip["10.0.0.1"]["orphaned"] == 40
    # the orphans are left out of the idle ages a timeout is derived from
    assert r.tables["established_idle"]["sample"] == 9


def test_orphans_need_far_more_entries_than_sockets(tree: Tree) -> None:
    lines, socks = [], []
    for k in range(20):
        lines.append(ct_tcp(f"10.0.3.{k + 1}", "10.0.0.1", 1000 + k, 443, remaining=432000 - 20))
        socks.append(("10.0.0.1", 443, f"10.0.3.{k + 1}", 1000 + k, "ESTABLISHED"))
    for k in range(12):  # 12 orphans, but 20 live sockets: not "far more"
        lines.append(ct_tcp("10.0.0.99", "10.0.0.1", 30000 + k, 443, remaining=7000))
    tree.base(count=32, **QUIET).stat([{}]).local(["10.0.0.1"]).sockets(socks).table(lines).ruleset(nft=NFT_STATEFUL)
    r = report_of(tree.root)
    assert ids(r) == []
    assert r.tables["per_ip"][0]["orphaned"] == 12


def test_orphans_from_before_a_timeout_change_still_count(tree: Tree) -> None:
    # the admin lowered the timeout to 7200 s; entries from before keep 431000 s left
    lines = [ct_tcp("10.0.0.99", "10.0.0.1", 30000 + k, 443, remaining=431000) for k in range(15)]
    tree.base(count=15, **QUIET).stat([{}]).local(["10.0.0.1"]).sockets([]).table(lines).ruleset(nft=NFT_STATEFUL)
    r = report_of(tree.root)
    assert ids(r) == [("orphaned-established", "warning")]
    assert finding(r, "orphaned-established").evidence["orphaned_total"] == 15
    assert any(n.startswith("15 TCP entries have more time left") for n in r.notes)


def test_concentrated_prefix(tree: Tree) -> None:
    lines = [ct_tcp(f"192.0.2.{k % 20 + 1}", "10.0.0.1", 10000 + k, 80, remaining=431990) for k in range(300)]
    tree.base(count=300, **QUIET).stat([{}]).local(["10.0.0.1"]).table(lines)
    r = report_of(tree.root)
    assert ids(r) == [("concentrated-prefix", "info")]
    ev = finding(r, "concentrated-prefix").evidence
    assert (ev["prefix"], ev["entries"], ev["share_percent"], ev["addresses"]) == ("192.0.2.0/24", 300, 100.0, 20)
    assert ev["top_addresses"][0] == {"ip": "192.0.2.1", "entries": 15}
    assert ev["states"] == {"tcp ESTABLISHED": 300}
    assert r.tables["sources"][0] == {"ip": "192.0.2.1", "entries": 15, "states": {"tcp ESTABLISHED": 15}}
    assert r.tables["prefixes"] == [{"prefix": "192.0.2.0/24", "entries": 300, "addresses": 20,
                                     "states": {"tcp ESTABLISHED": 300}}]
    # with a small table the same prefix could fill a quarter of it: warning
    tree.sysctls(nf_conntrack_max=1000, nf_conntrack_buckets=1000)
    assert ids(report_of(tree.root)) == [("concentrated-prefix", "warning")]
    # missing inputs are named, with what they affect
    missing = {m.input: m for m in report_of(tree.root).missing}
    assert set(missing) == {"proc/net/tcp", "proc/net/tcp6", "ruleset/nft.txt", "ruleset/iptables-save.txt",
                            "ruleset/ip6tables-save.txt"}
    assert missing["proc/net/tcp"].needed_for == ["orphans"] and missing["proc/net/tcp"].reason == "not present"


def test_udp_stale_unreplied_dnat(tree: Tree) -> None:
    lines = [ct_udp("10.0.0.1", "10.96.0.10", 5000 + k, 53, remaining=29 if k < 80 else 10,
                    rsrc="10.244.1.5") for k in range(100)]
    lines += [ct_tcp(f"10.{k}.9.1", "198.51.100.7", 2000 + k, 3000 + k, remaining=431000) for k in range(100)]
    tree.base(count=200, **QUIET).stat([{}]).local(["10.0.0.1"]).table(lines)
    r = report_of(tree.root)
    assert ids(r) == [("udp-stale", "warning")]
    f = finding(r, "udp-stale")
    ev = f.evidence
    assert (ev["unreplied"], ev["share_percent"], ev["fresh"], ev["udp_timeout_s"]) == (100, 50.0, 80, 30)
    assert ev["top_destinations"] == [{"destination": "10.96.0.10:53", "entries": 100}]
    assert ev["dnat"] == [{"mapping": "10.96.0.10:53 -> 10.244.1.5:53", "entries": 100}]
    assert f.recommendation.commands[0] == "conntrack -D -p udp -d 10.96.0.10 --dport 53"


def test_conntrack_unneeded(tree: Tree) -> None:
    tree.base(count=100, **QUIET).stat([{}]).ruleset(nft=NFT_STATELESS, iptables=IPT_EMPTY, ip6tables=IPT_EMPTY)
    r = report_of(tree.root)
    assert ids(r) == [("conntrack-unneeded", "info")]
    ev = finding(r, "conntrack-unneeded").evidence
    assert ev["rules_examined"] == 2 and ev["count"] == 100
    assert ev["ruleset_sources"] == ["ruleset/nft.txt", "ruleset/iptables-save.txt", "ruleset/ip6tables-save.txt"]
    assert ev["modules_using_nf_conntrack"] == ["nf_nat", "xt_conntrack"]
    assert "proc/net/nf_conntrack" in {m.input for m in r.missing}
    tree.sysctls(nf_conntrack_max=150, nf_conntrack_buckets=150)
    assert ids(report_of(tree.root)) == [("conntrack-unneeded", "warning")]
    tree.ruleset(iptables="*filter\n-A INPUT -m state --state ESTABLISHED -j ACCEPT\nCOMMIT\n")
    r = report_of(tree.root)
    assert ids(r) == [] and r.tables["rules"]["needs_conntrack_total"] == 1


def test_notrack_candidate(tree: Tree) -> None:
    lines = [ct_udp(f"10.{k}.1.1", "10.0.0.1", 40000 + k, 53, remaining=100, unreplied=False, assured=True)
             for k in range(150)]
    tree.base(count=150, **QUIET).stat([{}]).local(["10.0.0.1"]).sockets([]).table(lines).ruleset(nft=NFT_STATEFUL)
    r = report_of(tree.root)
    assert ids(r) == [("notrack-candidate", "info")]
    f = finding(r, "notrack-candidate")
    assert (f.evidence["proto"], f.evidence["port"], f.evidence["entries"]) == ("udp", 53, 150)
    assert "nft add rule inet notrack_svc prerouting udp dport 53 notrack" in f.recommendation.commands


def test_timeouts_above_default(tree: Tree) -> None:
    healthy(tree, nf_conntrack_tcp_timeout_close_wait=3600, nf_conntrack_udp_timeout_stream=180, **QUIET)
    r = report_of(tree.root)
    assert ids(r) == [("timeout-above-default", "info")]
    assert [t["name"] for t in finding(r, "timeout-above-default").evidence["timeouts"]] == [
        "nf_conntrack_tcp_timeout_close_wait",
        "nf_conntrack_udp_timeout_stream",
    ]


def test_two_reads_of_the_counters_tell_past_from_present(tree: Tree) -> None:
    healthy(tree, **QUIET).stat([{"insert_failed": 4, "drop": 2, "early_drop": 7}])
    first = (tree.root / "proc/net/stat/nf_conntrack").read_text()
    tree.stat([{"insert_failed": 4, "drop": 12, "early_drop": 7}])
    tree.write("proc/net/stat/nf_conntrack.later", (tree.root / "proc/net/stat/nf_conntrack").read_text())
    tree.write("proc/net/stat/nf_conntrack", first)
    tree.write("ctrace-bundle.json", json.dumps({"timing": {"proc/net/stat/nf_conntrack": [0.0, 0.01],
                                                            "proc/net/stat/nf_conntrack.later": [10.0, 10.01]}}))
    r = report_of(tree.root)
    assert ids(r) == [("early-drop", "info"), ("insert-failed", "info"), ("packets-dropped", "critical")]
    drop = finding(r, "packets-dropped")
    assert (drop.evidence["grew_by"], drop.evidence["interval_s"], drop.evidence["per_second"]) == (10, 10.0, 1.0)
    assert drop.title.endswith("(drop, since boot or module load; +10 in the last 10 s)")
    assert finding(r, "insert-failed").title.endswith("; none in the last 10 s)")
    assert r.tables["stats"]["growth"]["drop"] == 10 and r.tables["stats"]["interval_s"] == 10.0


def test_long_timeout_is_a_warning_when_it_fills_a_busy_table(tree: Tree) -> None:
    # 150 live connections idle up to 1500 s; 50 orphans idle 100000 s (excluded from the sample,
    # but reclaimed by a shorter timeout): 25 % of a table that is 50 % full
    lines, socks = [], []
    for k in range(150):
        peer = f"10.1.{k}.1"
        lines.append(ct_tcp(peer, "10.0.0.1", 20000 + k, 443, remaining=432000 - 10 * k))
        socks.append(("10.0.0.1", 443, peer, 20000 + k, "ESTABLISHED"))
    lines += [ct_tcp(f"10.2.{k}.1", "10.0.0.1", 30000 + k, 443, remaining=332000) for k in range(50)]
    tree.base(count=200, max=400, buckets=400).stat([{}]).local(["10.0.0.1"]).sockets(socks).table(lines)
    tree.ruleset(nft=NFT_STATEFUL)
    r = report_of(tree.root)
    assert ids(r) == [("established-timeout-long", "warning"), ("notrack-candidate", "info")]
    ev = finding(r, "established-timeout-long").evidence
    assert (ev["idle_sample"], ev["idle_p99_s"], ev["recommended_s"], ev["reclaimable_entries"]) == (150, 1480, 10800, 50)
