/* ctrace ABI: every record the kernel side emits, and the codes inside them.
 *
 * This header is the single definition of the event layout. It is shared by
 * the BPF programs (bpf/ctrace.bpf.c) and mirrored by ctrace/abi.py; the test
 * tests/unit/test_abi.py compiles it and proves every size, offset and code
 * agrees with the mirror. No kernel types: explicit-width fields only.
 *
 * Evolution: append fields at the end and bump CT_ABI_MINOR; readers accept
 * any record size >= the v1 size. Units and byte order are in the names:
 * *_ns nanoseconds, *_boot_ns CLOCK_BOOTTIME, *_be network byte order.
 * IPv4 addresses occupy the first 4 bytes of a 16-byte address field.
 */
#ifndef CTRACE_H
#define CTRACE_H

#ifdef __BPF__
/* bcc / clang -target bpf: kernel's __u* types come from its own headers. */
#else
#include <linux/types.h>
#endif

#define CT_ABI_MAJOR 1
#define CT_ABI_MINOR 0

/* ct_event.kind */
enum ct_kind {
	CT_KIND_NEW = 1,      /* entry confirmed into the table */
	CT_KIND_DESTROY = 2,  /* entry removed; reason = ct_destroy_reason */
	CT_KIND_EXISTING = 3, /* entry present when tracing began (initial snapshot) */
	CT_KIND_STATE = 4,    /* conntrack TCP state changed: ct_oldstate -> ct_state */
	CT_KIND_DROP = 5,     /* a new entry was refused; reason = ct_drop_reason */
	CT_KIND_ORPHAN = 6,   /* local socket reached CLOSE while its entry is ESTABLISHED */
	CT_KIND_SOCK = 7,     /* TCP socket state change: sk_oldstate -> sk_newstate */
	CT_KIND_LOST = 8,     /* value events of cause `reason` (ct_lost_cause) were lost */
	CT_KIND_COUNTER = 9,  /* counter `reason` (ct_counter) had `value` at ts_boot_ns */
};

/* ct_event.reason for CT_KIND_DESTROY: how the kernel came to remove it. The
 * user-facing reason (FIN, RST, established-idle timeout, ...) is derived from
 * this plus l4proto and ct_state. */
enum ct_destroy_reason {
	CT_DESTROY_UNKNOWN = 0,
	CT_DESTROY_TIMEOUT = 1,    /* expired: gc worker or lookup found it dead */
	CT_DESTROY_EARLY_DROP = 2, /* evicted to make room (table full) */
	CT_DESTROY_DELETE = 3,     /* ctnetlink delete or flush (conntrack -D/-F) */
	CT_DESTROY_NETNS = 4,      /* its network namespace went away */
	CT_DESTROY_KILL = 5,       /* killed by conntrack itself (e.g. SYN reopening a closed tuple) */
};

/* ct_event.reason for CT_KIND_DROP */
enum ct_drop_reason {
	CT_DROP_TABLE_FULL = 1,    /* allocation refused: nf_conntrack_max reached */
	CT_DROP_INSERT_FAILED = 2, /* confirm failed (clash or race); packet dropped */
};

/* ct_event.reason for CT_KIND_LOST: where the events were lost */
enum ct_lost_cause {
	CT_LOST_RINGBUF_FULL = 1, /* BPF could not reserve ring buffer space */
	CT_LOST_PERF_BUFFER = 2,  /* perf buffer overwrote (lost callback) */
	CT_LOST_MAP_FULL = 3,     /* a tracking map had no room (entry not correlated) */
	CT_LOST_CONSUMER = 4,     /* user space dropped events (e.g. recording write failed) */
	CT_LOST_PROBE_SKIPPED = 5, /* the kernel skipped a program run (nesting guard): counted
	                            * by user space from the programs' recursion_misses */
};

/* ct_event.reason for CT_KIND_COUNTER */
enum ct_counter {
	CT_COUNTER_COUNT = 1,         /* nf_conntrack_count */
	CT_COUNTER_MAX = 2,           /* nf_conntrack_max */
	CT_COUNTER_INSERT_FAILED = 3, /* sum over CPUs of conntrack -S insert_failed */
	CT_COUNTER_DROP = 4,          /* ... drop */
	CT_COUNTER_EARLY_DROP = 5,    /* ... early_drop */
	CT_COUNTER_BUCKETS = 6,       /* nf_conntrack_buckets */
	/* ctrace's own ring buffer, read by user space from its mapping: */
	CT_COUNTER_RING_BYTES = 7,      /* size of its data area */
	CT_COUNTER_RING_PEAK_BYTES = 8, /* most bytes waiting in it at a read since the
	                                 * previous COUNTER records: the reader's headroom */
};

/* ct_event.ct_state / ct_oldstate for TCP: the kernel's enum tcp_conntrack. */
enum ct_tcp_state {
	CT_TCP_NONE = 0,
	CT_TCP_SYN_SENT = 1,
	CT_TCP_SYN_RECV = 2,
	CT_TCP_ESTABLISHED = 3,
	CT_TCP_FIN_WAIT = 4,
	CT_TCP_CLOSE_WAIT = 5,
	CT_TCP_LAST_ACK = 6,
	CT_TCP_TIME_WAIT = 7,
	CT_TCP_CLOSE = 8,
	CT_TCP_SYN_SENT2 = 9,
};

/* ct_event.flags */
#define CT_FLAG_START_KNOWN 0x01 /* start_boot_ns is the real insert time */
#define CT_FLAG_SYNTHETIC 0x02   /* produced by a model, not a kernel */
#define CT_FLAG_ORPHANED 0x04    /* an ORPHAN record was emitted for this entry before this one */
#define CT_FLAG_DUMP_ID 0x08     /* EXISTING: ct_id is a listing's sequence number, not the kernel's;
                                  * later records of the entry carry the kernel's id: match by tuple */
/* 0x80 is reserved for user space (the model marks live orphans with it). */

/* ct_event.status_raw bits used by user space (kernel enum ip_conntrack_status) */
#define CT_IPS_SEEN_REPLY 0x02
#define CT_IPS_ASSURED 0x04
#define CT_IPS_CONFIRMED 0x08

struct ct_event {
	__u64 ts_boot_ns;    /* when it happened, CLOCK_BOOTTIME */
	__u64 ct_id;         /* opaque entry id, unique among live entries */
	__u64 start_boot_ns; /* DESTROY/STATE/ORPHAN: entry insert time (see CT_FLAG_START_KNOWN) */
	__u64 value;         /* LOST: count; COUNTER: value */
	__u32 netns_ino;     /* network namespace inode number */
	__u32 status_raw;    /* ct->status bits */
	__u32 timeout_s;     /* seconds left before the entry expires, at ts_boot_ns */
	__u32 pid;           /* SOCK/ORPHAN: tgid in context (unreliable in softirq) */
	__u8 orig_src[16];   /* original-direction tuple */
	__u8 orig_dst[16];
	__u8 reply_src[16];  /* reply-direction tuple (differs under NAT) */
	__u8 reply_dst[16];
	__u16 orig_sport_be;
	__u16 orig_dport_be;
	__u16 reply_sport_be;
	__u16 reply_dport_be;
	__u16 zone;          /* conntrack zone id */
	__u8 kind;           /* enum ct_kind */
	__u8 family;         /* AF_INET (2) or AF_INET6 (10) */
	__u8 l4proto;        /* IPPROTO_TCP, IPPROTO_UDP, ... */
	__u8 ct_state;       /* TCP: enum ct_tcp_state (current / at removal) */
	__u8 ct_oldstate;    /* STATE: previous TCP state */
	__u8 reason;         /* kind-specific code, see enums above */
	__u8 sk_oldstate;    /* SOCK: kernel TCP_* socket states */
	__u8 sk_newstate;
	__u8 flags;          /* CT_FLAG_* */
	__u8 _pad[5];
};

#endif /* CTRACE_H */
