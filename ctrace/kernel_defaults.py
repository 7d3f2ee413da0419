"""The kernel's default conntrack timeouts, in seconds
(net/netfilter/nf_conntrack_proto_{tcp,udp,icmp,generic}.c), by sysctl short name."""

from typing import Dict

TIMEOUTS: Dict[str, int] = {
    "nf_conntrack_tcp_timeout_syn_sent": 120,
    "nf_conntrack_tcp_timeout_syn_recv": 60,
    "nf_conntrack_tcp_timeout_established": 432000,
    "nf_conntrack_tcp_timeout_fin_wait": 120,
    "nf_conntrack_tcp_timeout_close_wait": 60,
    "nf_conntrack_tcp_timeout_last_ack": 30,
    "nf_conntrack_tcp_timeout_time_wait": 120,
    "nf_conntrack_tcp_timeout_close": 10,
    "nf_conntrack_tcp_timeout_max_retrans": 300,
    "nf_conntrack_tcp_timeout_unacknowledged": 300,
    "nf_conntrack_udp_timeout": 30,
    "nf_conntrack_udp_timeout_stream": 120,  # 180 on older kernels
    "nf_conntrack_icmp_timeout": 30,
    "nf_conntrack_icmpv6_timeout": 30,
    "nf_conntrack_generic_timeout": 600,
}
