"""The kernel's text formats, including the variants between kernels and tools."""

from doctor_tree import STAT_HEADER_66, STAT_HEADER_510, ct_tcp, tcp_lines

from ctrace.doctor.parse import (
    iter_proc_tcp,
    parse_conntrack_s,
    parse_ct_line,
    parse_fib_trie,
    parse_if_inet6,
    parse_proc_tcp,
    parse_slab_objsize,
    parse_stat_table,
    prefix_of,
)
from ctrace.doctor.ruleset import RulesetScan, scan_iptables_save, scan_nft


def test_proc_line_tcp_established() -> None:
    e = parse_ct_line(
        "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.0.2 dst=10.0.0.1 sport=40000 dport=80 "
        "src=10.0.0.1 dst=10.0.0.2 sport=80 dport=40000 [ASSURED] mark=0 zone=0 use=2"
    )
    assert e is not None
    assert (e.l3, e.proto, e.timeout, e.state) == ("ipv4", "tcp", 431999, "ESTABLISHED")
    assert (e.orig.src, e.orig.dst, e.orig.sport, e.orig.dport) == ("10.0.0.2", "10.0.0.1", 40000, 80)
    assert (e.reply.src, e.reply.dst, e.reply.sport, e.reply.dport) == ("10.0.0.1", "10.0.0.2", 80, 40000)
    assert e.assured and not e.unreplied and e.zone == 0


def test_proc_line_udp_unreplied_with_accounting_and_timestamp() -> None:
    e = parse_ct_line(
        "ipv4     2 udp      17 28 src=10.0.0.2 dst=10.96.0.10 sport=5353 dport=53 packets=3 bytes=180 "
        "[UNREPLIED] src=10.244.1.5 dst=10.0.0.2 sport=53 dport=5353 packets=0 bytes=0 mark=0 "
        "zone=0 delta-time=42 use=1"
    )
    assert e is not None
    assert e.state is None and e.unreplied and not e.assured
    assert e.reply.src == "10.244.1.5" and e.delta_time == 42 and e.timeout == 28


def test_conntrack_tool_line_without_l3_columns() -> None:
    e = parse_ct_line(
        "tcp      6 299 ESTABLISHED src=192.0.2.1 dst=198.51.100.2 sport=1 dport=2 "
        "src=198.51.100.2 dst=192.0.2.1 sport=2 dport=1 [ASSURED] mark=0 use=1"
    )
    assert e is not None and e.l3 == "ipv4" and e.timeout == 299


def test_ipv6_full_form_is_normalised() -> None:
    e = parse_ct_line(ct_tcp("2001:db8::2", "2001:db8::1", 5000, 443))
    assert e is not None and e.l3 == "ipv6"
    assert e.orig.src == "2001:db8::2" and e.reply.src == "2001:db8::1"


def test_offloaded_entry_has_no_timeout() -> None:
    e = parse_ct_line(
        "ipv4     2 tcp      6 ESTABLISHED src=10.0.0.2 dst=10.0.0.1 sport=1 dport=2 "
        "src=10.0.0.1 dst=10.0.0.2 sport=2 dport=1 [OFFLOAD] mark=0 use=2"
    )
    assert e is not None and e.timeout is None and e.offload and e.state == "ESTABLISHED"


def test_icmp_has_no_ports_and_damaged_lines_are_none() -> None:
    e = parse_ct_line(
        "ipv4     2 icmp     1 29 src=10.0.0.2 dst=10.0.0.1 type=8 code=0 id=7 "
        "src=10.0.0.1 dst=10.0.0.2 type=0 code=0 id=7 mark=0 use=1"
    )
    assert e is not None and e.orig.sport is None and e.state is None
    assert parse_ct_line("garbage") is None
    assert parse_ct_line("ipv4 2 tcp six 100 ESTABLISHED src=1.2.3.4") is None
    assert parse_ct_line("ipv4 2 tcp 6 100 ESTABLISHED src=1.2.3.4 dst=5.6.7.8 sport=x dport=1 src=5.6.7.8 dst=1.2.3.4") is None


def test_stat_table_by_header_names_on_both_layouts() -> None:
    for header, key in ((STAT_HEADER_510, "delete_list"), (STAT_HEADER_66, "chaintoolong")):
        cols = header.split()
        row1 = ["%08x" % 7] + ["%08x" % 0] * (len(cols) - 1)
        row2 = list(row1)
        row1[cols.index("insert_failed")] = "%08x" % 0x1F
        row2[cols.index("insert_failed")] = "%08x" % 1
        row2[cols.index("early_drop")] = "0000000a"
        st = parse_stat_table("\n".join([header, " ".join(row1), " ".join(row2), "zz"]), "x")
        assert st is not None
        assert st.total("insert_failed") == 32 and st.by_cpu("insert_failed") == [31, 1]
        assert st.total("early_drop") == 10 and key in st.columns and "clash_resolve" in st.columns
        assert st.bad_rows == 1 and "entries" not in st.columns
    assert parse_stat_table("not a header\n1 2 3\n", "x") is None


def test_conntrack_dash_s() -> None:
    st = parse_conntrack_s(
        "cpu=0   \tfound=0 invalid=5 insert=0 insert_failed=3 drop=2 early_drop=0 error=0 search_restart=1 "
        "clash_resolve=4 chaintoolong=0 \ncpu=1   \tfound=0 invalid=0 insert=0 insert_failed=1 drop=0 "
        "early_drop=7 error=0 search_restart=0 clash_resolve=0 chaintoolong=0 \n",
        "conntrack/conntrack-S.txt",
    )
    assert st is not None
    assert (st.total("insert_failed"), st.total("drop"), st.total("early_drop")) == (4, 2, 7)


def test_proc_tcp_decodes_host_byte_order_and_v4_mapped() -> None:
    text = tcp_lines([("127.0.0.1", 8080, "10.1.2.3", 50000, "ESTABLISHED")], v6=False)
    assert "0100007F:1F90" in text  # what a little-endian kernel prints for 127.0.0.1:8080
    t = list(iter_proc_tcp(text.splitlines(), "little"))
    assert [(s.local, s.lport, s.remote, s.rport, s.state) for s in t] == [
        ("127.0.0.1", 8080, "10.1.2.3", 50000, "ESTABLISHED")
    ]
    big = list(iter_proc_tcp(tcp_lines([("10.0.0.1", 1, "10.0.0.2", 2, "TIME_WAIT")], False, "big").splitlines(), "big"))
    assert big[0].local == "10.0.0.1" and big[0].state == "TIME_WAIT"
    six = list(iter_proc_tcp(
        tcp_lines([("::ffff:10.0.0.1", 80, "::ffff:10.0.0.9", 999, "ESTABLISHED"),
                   ("2001:db8::1", 443, "2001:db8::9", 1000, "CLOSE_WAIT")], True).splitlines(),
        "little",
    ))
    assert [(s.local, s.remote) for s in six] == [("10.0.0.1", "10.0.0.9"), ("2001:db8::1", "2001:db8::9")]
    damaged = parse_proc_tcp(["  sl local", "   0: XYZ:1 00000000:0000 0A", ""], "little")
    assert damaged.bad_lines == 1 and damaged.count == 0
    table = parse_proc_tcp(text.splitlines(), "little")
    assert table.keys == {("127.0.0.1", 8080, "10.1.2.3", 50000)} and table.peers == {"10.1.2.3": 1}
    assert table.states == {"127.0.0.1": {"ESTABLISHED": 1}}


def test_local_addresses_slab_and_prefix() -> None:
    trie = (
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.0.0.0\n        /24 link UNICAST\n"
        "     |-- 10.0.0.1\n        /32 host LOCAL\n     |-- 10.0.0.255\n        /32 link BROADCAST\n"
    )
    assert parse_fib_trie(trie) == {"10.0.0.1"}
    assert parse_if_inet6("20010db8000000000000000000000001 02 40 00 80 eth0\n") == {"2001:db8::1"}
    assert parse_slab_objsize("slabinfo - version: 2.1\nnf_conntrack 10 20 320 25 2\n") == 320
    assert prefix_of("192.0.2.77") == ("192.0.2.0/24", 24)
    assert prefix_of("2001:db8:1:2::5") == ("2001:db8:1:2::/64", 64)


def test_iptables_save_scan() -> None:
    scan = RulesetScan()
    scan_iptables_save(
        "*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p udp --dport 53 -j CT --notrack\nCOMMIT\n"
        "*filter\n:INPUT DROP [0:0]\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        "-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
        "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -o eth0 -j MASQUERADE\nCOMMIT\n",
        "ruleset/iptables-save.txt",
        scan,
    )
    assert [(u.where, u.reason) for u in scan.uses] == [
        ("filter/INPUT", "conntrack match"),
        ("nat", "NAT table present"),
        ("nat/POSTROUTING", "NAT"),
    ]
    assert [u.reason for u in scan.notrack] == ["CT --notrack"] and scan.rules == 4


def test_nft_scan() -> None:
    scan = RulesetScan()
    scan_nft(
        "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n"
        "\t\tct state established,related accept\n\t\ttcp dport 22 accept\n\t}\n}\n"
        "table ip nat {\n\tchain post {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        "\t\toifname \"eth0\" masquerade\n\t}\n}\n"
        "table inet raw {\n\tchain pre {\n\t\ttype filter hook prerouting priority raw; policy accept;\n"
        "\t\tudp dport 53 notrack\n\t}\n}\n"
        "table ip legacy {\n\tchain x {\n\t\tmeta l4proto tcp xt match \"connlimit\" counter\n\t}\n}\n",
        "ruleset/nft.txt",
        scan,
    )
    assert [(u.where, u.reason) for u in scan.uses] == [
        ("inet filter/input", "ct state"),
        ("ip nat/post", "NAT chain"),
        ("ip nat/post", "NAT"),
        ("ip legacy/x", "connection limit"),
    ]
    assert [u.where for u in scan.notrack] == ["inet raw/pre"]
    quiet = RulesetScan()
    scan_nft("table inet filter {\n\tchain input {\n\t\ttcp dport 22 accept\n\t}\n}\n", "n", quiet)
    assert quiet.uses == [] and quiet.rules == 1


def test_same_entry_from_proc_conntrack_extended_and_plain() -> None:
    # one IPv6 UDP entry as Linux 6.18's /proc and conntrack-tools 1.4.7 print it
    proc = ("ipv6     10 udp      17 29 src=0000:0000:0000:0000:0000:0000:0000:0001 "
            "dst=0000:0000:0000:0000:0000:0000:0000:0001 sport=52573 dport=9999 [UNREPLIED] "
            "src=0000:0000:0000:0000:0000:0000:0000:0001 dst=0000:0000:0000:0000:0000:0000:0000:0001 "
            "sport=9999 dport=52573 mark=0 zone=0 use=2")
    ext = ("ipv6     10 udp      17 29 src=::1 dst=::1 sport=52573 dport=9999 [UNREPLIED] src=::1 dst=::1 "
           "sport=9999 dport=52573 mark=0 use=1")
    plain = "udp      17 29 src=::1 dst=::1 sport=52573 dport=9999 [UNREPLIED] src=::1 dst=::1 sport=9999 dport=52573 mark=0 use=1"
    a, b, c = (parse_ct_line(x) for x in (proc, ext, plain))
    assert a is not None and b is not None and c is not None
    assert a._replace(zone=None) == b == c
    assert a.orig.src == "::1" and a.l3 == "ipv6" and a.unreplied and a.orig.dport == 9999
