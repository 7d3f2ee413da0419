"""Parsers of conntrack listings and statistics."""

import ipaddress

from ctrace import abi, sysinfo

LISTING = """\
ipv4     2 tcp      6 431999 ESTABLISHED src=10.1.0.2 dst=10.9.0.1 sport=40000 dport=80 src=10.9.0.1 dst=10.1.0.2 sport=80 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=10.1.0.3 dst=10.9.0.1 sport=5353 dport=53 [UNREPLIED] src=10.9.0.1 dst=10.1.0.3 sport=53 dport=5353 mark=0 use=1
ipv6     10 tcp      6 119 TIME_WAIT src=fd00::2 dst=fd00::1 sport=41000 dport=443 src=fd00::1 dst=fd00::2 sport=443 dport=41000 [ASSURED] mark=0 zone=7 use=1
ipv4     2 icmp     1 29 src=10.1.0.2 dst=10.9.0.1 type=8 code=0 id=77 src=10.9.0.1 dst=10.1.0.2 type=0 code=0 id=77 mark=0 use=1
conntrack v1.4.6 (conntrack-tools): 4 flow entries have been shown.
"""


def test_parse_entries():
    arr = sysinfo.parse_entries(LISTING, netns=4026531992, ts_boot_ns=123)
    assert len(arr) == 4
    assert (arr["kind"] == abi.Kind.EXISTING).all()
    assert list(arr["ct_id"]) == [1, 2, 3, 4]
    tcp, udp, v6, icmp = arr
    assert tcp["ct_state"] == abi.TcpState.ESTABLISHED
    assert tcp["timeout_s"] == 431999
    assert tcp["orig_sport_be"] == 40000 and tcp["orig_dport_be"] == 80
    assert bytes(tcp["orig_src"][:4]) == ipaddress.ip_address("10.1.0.2").packed
    assert bytes(tcp["orig_src"][4:]) == bytes(12)
    assert tcp["status_raw"] & abi.IPS_ASSURED and tcp["status_raw"] & abi.IPS_SEEN_REPLY
    assert not udp["status_raw"] & abi.IPS_SEEN_REPLY
    assert udp["l4proto"] == 17 and udp["ct_state"] == 0
    assert v6["family"] == abi.AF_INET6 and v6["zone"] == 7
    assert v6["ct_state"] == abi.TcpState.TIME_WAIT
    assert bytes(v6["orig_dst"]) == ipaddress.ip_address("fd00::1").packed
    assert icmp["orig_sport_be"] == 77 and icmp["orig_dport_be"] == 8 << 8
    assert (arr["netns_ino"] == 4026531992).all()
    keys = list(sysinfo.entry_keys(arr))
    assert len(set(keys)) == 4


def test_parse_stat():
    text = ("entries  searched found new invalid ignore delete delete_list insert insert_failed drop "
            "early_drop icmp_error  expect_new expect_create expect_delete search_restart\n"
            "0000000a  00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 "
            "00000002 00000003 00000001 00000000  00000000 00000000 00000000 00000000\n"
            "0000000a  00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 "
            "00000001 00000010 00000000 00000000  00000000 00000000 00000000 00000000\n")
    s = sysinfo.parse_stat(text)
    assert s["entries"] == 10
    assert s["insert_failed"] == 3
    assert s["drop"] == 0x13
    assert s["early_drop"] == 1


def test_read_sysctls(tmp_path):
    d = tmp_path / "proc/sys/net/netfilter"
    d.mkdir(parents=True)
    (d / "nf_conntrack_max").write_text("65536\n")
    (d / "nf_conntrack_tcp_timeout_established").write_text("432000\n")
    (d / "nf_conntrack_helper").write_text("0\n")
    (d / "nf_log_all_netns").write_text("0\n")
    s = sysinfo.read_sysctls(str(tmp_path))
    assert s == {"nf_conntrack_max": 65536, "nf_conntrack_tcp_timeout_established": 432000,
                 "nf_conntrack_helper": 0}
