/* ctrace BPF programs (bcc). One text, compiled once per run; which programs
 * are attached, and how, is decided by ctrace/kernel.py (ProbePlan) and done
 * by ctrace/sources/live.py. docs/PROBES.md explains every probe.
 *
 * Records: bpf/ctrace.h (struct ct_event). Configuration arrives as -D flags:
 *   CT_RINGBUF, CT_RING_PAGES   ring buffer (else perf buffer)
 *   CT_HAVE_BOOT_NS, CT_HAVE_JIFFIES64
 *   CT_MAP_ENTRIES              live-entry maps (>= nf_conntrack_max)
 *   CT_IP_ENTRIES               per netns+IP aggregate map
 *
 *   CT_FENTRY                   also build the fentry/fexit variants (bcc
 *                               MODULE_KFUNC_PROBE), see the end of this file
 *   CT_EARLY_DROP_CLONE         early_drop is attached as a gcc clone: its
 *                               arguments are not read
 *
 * Entry/return pairs hand what the entry saw to the return through a small
 * stack per task and function (the stash, below).
 */
#include <uapi/linux/ptrace.h>
#include <linux/skbuff.h>
#include <net/sock.h>
#include <net/inet_sock.h>
#include <net/net_namespace.h>
#include <net/netfilter/nf_conntrack.h>
#include "ctrace.h"

#ifndef CT_MAP_ENTRIES
#define CT_MAP_ENTRIES 262144
#endif
#ifndef CT_IP_ENTRIES
#define CT_IP_ENTRIES 65536
#endif
#ifndef CT_RING_PAGES
#define CT_RING_PAGES 4096
#endif

#define CT_NKINDS 16
#define CT_NLOST 8
#define CT_NREASON 8

/* ---------------------------------------------------------------- maps */

/* Events lost, per cause (enum ct_lost_cause), summed over CPUs by user space. */
BPF_PERCPU_ARRAY(lost, u64, CT_NLOST);
/* Events produced (handed over or lost), per kind: conservation checks. */
BPF_PERCPU_ARRAY(produced, u64, CT_NKINDS);

/* Orphan check statistics: [0] TCP sockets reaching CLOSE, [1] of those
 * whose entry was found, [2] found still ESTABLISHED. */
BPF_PERCPU_ARRAY(sockstats, u64, 4);

static __always_inline void sockstat_inc(u32 i)
{
	u64 *v = sockstats.lookup(&i);
	if (v)
		*v += 1;
}

static __always_inline void lost_inc(u32 cause)
{
	u64 *v = lost.lookup(&cause);
	if (v)
		*v += 1;
}

static __always_inline void produced_inc(u32 kind)
{
	u64 *v = produced.lookup(&kind);
	if (v)
		*v += 1;
}

#include "compat.h"

/* Event output: ring buffer (5.8, commit 457f44363a88, "bpf: Implement BPF
 * ring buffer and verifier support for it") or perf buffer where the kernel
 * lacks it. Both paths count every event they fail to hand over. */
#ifdef CT_RINGBUF
BPF_RINGBUF_OUTPUT(events, CT_RING_PAGES);
static __always_inline struct ct_event *ev_reserve(void)
{
	struct ct_event *e = events.ringbuf_reserve(sizeof(struct ct_event));
	if (e)
		__builtin_memset(e, 0, sizeof(*e));
	return e;
}
/* User space drains on a timer, so no wakeup per event (BPF_RB_NO_WAKEUP). */
static __always_inline void ev_submit(void *ctx, struct ct_event *e)
{
	events.ringbuf_submit(e, 1);
}
#define CT_LOST_OUTPUT CT_LOST_RINGBUF_FULL
#else
BPF_PERF_OUTPUT(events);
BPF_PERCPU_ARRAY(ev_scratch, struct ct_event, 1);
static __always_inline struct ct_event *ev_reserve(void)
{
	u32 zero = 0;
	struct ct_event *e = ev_scratch.lookup(&zero);
	if (e)
		__builtin_memset(e, 0, sizeof(*e));
	return e;
}
static __always_inline void ev_submit(void *ctx, struct ct_event *e)
{
	if (events.perf_submit(ctx, e, sizeof(struct ct_event)) < 0)
		lost_inc(CT_LOST_PERF_BUFFER);
}
#define CT_LOST_OUTPUT CT_LOST_PERF_BUFFER
#endif

/* A confirmed entry we saw inserted: when, and what we already said about it. */
struct ct_live {
	u64 start_ns;
	u32 flags; /* CT_LIVE_* */
	u32 _pad;
};
#define CT_LIVE_ORPHANED 0x1
BPF_HASH(ctlive, u64, struct ct_live, CT_MAP_ENTRIES);

/* (netns, original tuple) -> entry pointer, for sockets to find their entry;
 * a TCP entry whose reply tuple NAT changed is also keyed by its reply tuple
 * (ct_reply_natted): up to two keys per entry. */
struct ct_tkey {
	u32 netns;
	u8 family;
	u8 proto;
	u16 sport_be;
	u16 dport_be;
	u16 _pad;
	u8 src[16];
	u8 dst[16];
};
BPF_HASH(tuples, struct ct_tkey, u64, CT_MAP_ENTRIES);
/* The same keyed with netns 0: a socket in one namespace (a pod) whose flow
 * is tracked in another (the host). Last insert wins on identical tuples. */
BPF_HASH(tuples_any, struct ct_tkey, u64, CT_MAP_ENTRIES);

/* Entries whose removal was already reported (nf_ct_delete seen): the free
 * path must not report them again. Cleared when the entry is freed. */
BPF_TABLE("lru_hash", u64, u8, gone, 65536);

/* Per netns + original source IP aggregates. */
struct ct_ipkey {
	u32 netns;
	u8 family;
	u8 _pad[3];
	u8 addr[16];
};
struct ct_ipval {
	u64 created;
	u64 destroyed[CT_NREASON]; /* by enum ct_destroy_reason */
	u64 orphans;
	u64 drop_table_full;
	u64 drop_insert_failed;
};
BPF_HASH(ipstats, struct ct_ipkey, struct ct_ipval, CT_IP_ENTRIES);

/* Removal-path caller tags (enum ct_destroy_reason): ctnetlink delete/flush
 * and netns cleanup run in a task that may reschedule: keyed by task. (early_drop
 * is tagged through the stash below, with the namespace it evicts in.) */
BPF_HASH(task_reason, u64, u32, 1024);

/* What an entry program hands its return program (the stash). Keyed by task
 * (its task_struct: each CPU's idle task has its own) and function, not by
 * CPU: on a preemptible kernel (CONFIG_PREEMPT, PREEMPT_LAZY: Debian's 7.2) a
 * task can be preempted, or moved to another CPU, between a function's entry
 * and its return. A softirq nesting in a task pushes and pops above it. The
 * slots are a ring: a push whose return program never ran (a run the kernel
 * skipped, counted) is overwritten in time and never breaks the pairs after
 * it; LRU ages out such leftovers of tasks that exit. */
#define ST_CONFIRM 0
#define ST_TCP 1
#define ST_ALLOC 2
#define ST_EARLY_DROP 3
#define ST_DEPTH 4
#ifndef CT_STASH_ENTRIES
#define CT_STASH_ENTRIES 8192
#endif
struct ct_stash_key {
	u64 task;
	u32 fn;
	u32 _pad;
};
struct ct_stash {
	u32 depth;
	u32 _pad;
	u64 a[ST_DEPTH];
	u64 b[ST_DEPTH];
};
BPF_TABLE("lru_hash", struct ct_stash_key, struct ct_stash, stash, CT_STASH_ENTRIES);

static __always_inline void stash_push(u32 fn, u64 a, u64 b)
{
	struct ct_stash_key k = {.task = bpf_get_current_task(), .fn = fn};
	struct ct_stash zero = {};
	struct ct_stash *s = stash.lookup_or_try_init(&k, &zero);
	if (!s) {
		lost_inc(CT_LOST_MAP_FULL);
		return;
	}
	/* Claim the slot before filling it: a push nesting here takes the next. */
	u32 d = s->depth;
	s->depth = d + 1;
	s->a[d & (ST_DEPTH - 1)] = a;
	s->b[d & (ST_DEPTH - 1)] = b;
}

/* The top slot of the task's stash for fn, left in place: the entry, or NULL if
 * the stash is empty (*a and *b then untouched). */
static __always_inline struct ct_stash *stash_peek(struct ct_stash_key *k, u64 *a, u64 *b)
{
	struct ct_stash *s = stash.lookup(k);
	if (!s || s->depth == 0)
		return NULL;
	u32 d = (s->depth - 1) & (ST_DEPTH - 1);
	*a = s->a[d];
	*b = s->b[d];
	return s;
}

static __always_inline int stash_pop(u32 fn, u64 *a, u64 *b)
{
	struct ct_stash_key k = {.task = bpf_get_current_task(), .fn = fn};
	struct ct_stash *s = stash_peek(&k, a, b);
	if (!s)
		return 0;
	/* The slot was read before it is released. */
	u32 d = s->depth - 1;
	s->depth = d;
	if (d == 0)
		stash.delete(&k);
	return 1;
}

/* ---------------------------------------------------------------- reading entries */

#define CT_NFCT_PTRMASK (~7UL) /* skb->_nfct: pointer | ctinfo (3 bits) */
#define CT_IS_ERR(x) ((unsigned long)(x) >= (unsigned long)-4095)

/* Everything ctrace reads from one struct nf_conn, in one place. */
struct ct_info {
	struct nf_conntrack_tuple orig;
	struct nf_conntrack_tuple reply;
	u32 status;
	u32 timeout;
	u32 netns;
	u16 zone;
	u8 tcp_state;
	u8 _pad;
};

static __always_inline u32 net_inum(struct net *net)
{
	u32 inum = 0;
	if (net)
		bpf_probe_read_kernel(&inum, sizeof(inum), &net->ns.inum);
	return inum;
}

static __always_inline void tuple_clean(struct nf_conntrack_tuple *t)
{
	/* IPv4 uses the first 4 bytes of the 16-byte address unions. */
	if (t->src.l3num == AF_INET) {
		__builtin_memset((u8 *)&t->src.u3 + 4, 0, 12);
		__builtin_memset((u8 *)&t->dst.u3 + 4, 0, 12);
	}
}

static __always_inline void ct_read(struct nf_conn *ct, struct ct_info *ci)
{
	unsigned long status = 0;
	struct net *net = NULL;

	bpf_probe_read_kernel(&ci->orig, sizeof(ci->orig),
			      &ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple);
	bpf_probe_read_kernel(&ci->reply, sizeof(ci->reply),
			      &ct->tuplehash[IP_CT_DIR_REPLY].tuple);
	tuple_clean(&ci->orig);
	tuple_clean(&ci->reply);
	bpf_probe_read_kernel(&status, sizeof(status), &ct->status);
	ci->status = (u32)status;
	bpf_probe_read_kernel(&ci->timeout, sizeof(ci->timeout), &ct->timeout);
#ifdef CONFIG_NET_NS
	bpf_probe_read_kernel(&net, sizeof(net), &ct->ct_net.net);
#endif
	ci->netns = net_inum(net);
#ifdef CONFIG_NF_CONNTRACK_ZONES
	bpf_probe_read_kernel(&ci->zone, sizeof(ci->zone), &ct->zone.id);
#else
	ci->zone = 0;
#endif
	ci->tcp_state = 0;
	if (ci->orig.dst.protonum == IPPROTO_TCP)
		bpf_probe_read_kernel(&ci->tcp_state, sizeof(ci->tcp_state),
				      &ct->proto.tcp.state);
}

static __always_inline u8 ct_read_state(struct nf_conn *ct)
{
	u8 st = 0;
	bpf_probe_read_kernel(&st, sizeof(st), &ct->proto.tcp.state);
	return st;
}

static __always_inline u32 ct_read_status(struct nf_conn *ct)
{
	unsigned long status = 0;
	bpf_probe_read_kernel(&status, sizeof(status), &ct->status);
	return (u32)status;
}

static __always_inline void ev_tuple(struct ct_event *e, struct nf_conntrack_tuple *o,
				     struct nf_conntrack_tuple *r)
{
	__builtin_memcpy(e->orig_src, &o->src.u3, 16);
	__builtin_memcpy(e->orig_dst, &o->dst.u3, 16);
	e->orig_sport_be = o->src.u.all;
	e->orig_dport_be = o->dst.u.all;
	e->family = (u8)o->src.l3num;
	e->l4proto = o->dst.protonum;
	if (r) {
		__builtin_memcpy(e->reply_src, &r->src.u3, 16);
		__builtin_memcpy(e->reply_dst, &r->dst.u3, 16);
		e->reply_sport_be = r->src.u.all;
		e->reply_dport_be = r->dst.u.all;
	}
}

static __always_inline void ev_fill(struct ct_event *e, u8 kind, u64 ts, u64 ctp,
				    struct ct_info *ci)
{
	s32 left = ct_jiffies_left(ci->timeout);
	e->kind = kind;
	e->ts_boot_ns = ts;
	e->ct_id = ctp;
	e->netns_ino = ci->netns;
	e->status_raw = ci->status;
	e->timeout_s = left > 0 ? (u32)left / CONFIG_HZ : 0;
	e->zone = ci->zone;
	e->ct_state = ci->tcp_state;
	ev_tuple(e, &ci->orig, &ci->reply);
}

static __always_inline void tkey_make(struct ct_tkey *k, u32 netns, struct nf_conntrack_tuple *t)
{
	k->netns = netns;
	k->family = (u8)t->src.l3num;
	k->proto = t->dst.protonum;
	k->sport_be = t->src.u.all;
	k->dport_be = t->dst.u.all;
	__builtin_memcpy(k->src, &t->src.u3, 16);
	__builtin_memcpy(k->dst, &t->dst.u3, 16);
}

static __always_inline struct ct_ipval *ipval_get(u32 netns, struct nf_conntrack_tuple *t)
{
	struct ct_ipkey k = {};
	k.netns = netns;
	k.family = (u8)t->src.l3num;
	__builtin_memcpy(k.addr, &t->src.u3, 16);
	struct ct_ipval *v = ipstats.lookup(&k);
	if (v)
		return v;
	struct ct_ipval zero = {};
	ipstats.insert(&k, &zero);
	v = ipstats.lookup(&k);
	if (!v)
		lost_inc(CT_LOST_MAP_FULL);
	return v;
}

/* Key entry ctp under tuple t in `tuples` (netns, tuple) and `tuples_any`
 * (tuple alone); k is scratch space. */
static __always_inline void tuple_index(struct ct_tkey *k, u32 netns, struct nf_conntrack_tuple *t, u64 ctp)
{
	tkey_make(k, netns, t);
	if (tuples.update(k, &ctp) != 0)
		lost_inc(CT_LOST_MAP_FULL);
	k->netns = 0;
	tuples_any.update(k, &ctp);
}

/* Remove tuple_index's keys, each only if it still points to ctp (the tuple
 * may since belong to a newer entry). */
static __always_inline void tuple_unindex(struct ct_tkey *k, u32 netns, struct nf_conntrack_tuple *t, u64 ctp)
{
	tkey_make(k, netns, t);
	u64 *cur = tuples.lookup(k);
	if (cur && *cur == ctp)
		tuples.delete(k);
	k->netns = 0;
	cur = tuples_any.lookup(k);
	if (cur && *cur == ctp)
		tuples_any.delete(k);
}

/* ---------------------------------------------------------------- insert */

/* NAT happened when the reply tuple is not the original one inverted (by
 * confirm time NAT has mangled the reply tuple, and it never changes after).
 * Then a local socket behind the translation (DNAT to a local server) has the
 * reply tuple's addresses: index TCP entries under it too (only TCP sockets
 * look entries up). */
static __always_inline int ct_reply_natted(struct ct_info *ci)
{
	struct nf_conntrack_tuple *o = &ci->orig, *r = &ci->reply;
	if (o->dst.protonum != IPPROTO_TCP)
		return 0;
	if (r->src.u.all != o->dst.u.all || r->dst.u.all != o->src.u.all)
		return 1;
	u64 a[2] = {}, b[2] = {}, c[2] = {}, d[2] = {};
	__builtin_memcpy(a, &r->src.u3, 16);
	__builtin_memcpy(b, &o->dst.u3, 16);
	__builtin_memcpy(c, &r->dst.u3, 16);
	__builtin_memcpy(d, &o->src.u3, 16);
	return a[0] != b[0] || a[1] != b[1] || c[0] != d[0] || c[1] != d[1];
}

static __always_inline void on_new(void *ctx, u64 ctp)
{
	struct ct_info ci = {};
	u64 ts = ct_now_ns();
	ct_read((struct nf_conn *)ctp, &ci);

	struct ct_live lv = {};
	lv.start_ns = ts;
	if (ctlive.update(&ctp, &lv) != 0)
		lost_inc(CT_LOST_MAP_FULL);
	struct ct_tkey k = {};
	tuple_index(&k, ci.netns, &ci.orig, ctp);
	if (ct_reply_natted(&ci))
		tuple_index(&k, ci.netns, &ci.reply, ctp);
	struct ct_ipval *v = ipval_get(ci.netns, &ci.orig);
	if (v)
		__sync_fetch_and_add(&v->created, 1);

	produced_inc(CT_KIND_NEW);
	struct ct_event *e = ev_reserve();
	if (!e) {
		lost_inc(CT_LOST_OUTPUT);
		return;
	}
	ev_fill(e, CT_KIND_NEW, ts, ctp, &ci);
	e->start_boot_ns = ts;
	e->flags = CT_FLAG_START_KNOWN;
	ev_submit(ctx, e);
}

static __always_inline void on_drop(void *ctx, u8 reason, u64 ctp, u32 netns, u16 zone,
				    struct nf_conntrack_tuple *o, struct nf_conntrack_tuple *r,
				    u32 status, u8 tcp_state)
{
	struct ct_ipval *v = ipval_get(netns, o);
	if (v) {
		if (reason == CT_DROP_TABLE_FULL)
			__sync_fetch_and_add(&v->drop_table_full, 1);
		else
			__sync_fetch_and_add(&v->drop_insert_failed, 1);
	}
	produced_inc(CT_KIND_DROP);
	struct ct_event *e = ev_reserve();
	if (!e) {
		lost_inc(CT_LOST_OUTPUT);
		return;
	}
	e->kind = CT_KIND_DROP;
	e->reason = reason;
	e->ts_boot_ns = ct_now_ns();
	e->ct_id = ctp;
	e->netns_ino = netns;
	e->zone = zone;
	e->status_raw = status;
	e->ct_state = tcp_state;
	ev_tuple(e, o, r);
	ev_submit(ctx, e);
}

/* __nf_conntrack_confirm(struct sk_buff *skb) -> NF_ACCEPT / NF_DROP */
static __always_inline int on_confirm_e(struct sk_buff *skb)
{
	unsigned long nfct = 0;
	bpf_probe_read_kernel(&nfct, sizeof(nfct), &skb->_nfct);
	stash_push(ST_CONFIRM, (u64)skb, nfct & CT_NFCT_PTRMASK);
	return 0;
}

int confirm_e(struct pt_regs *ctx)
{
	return on_confirm_e((struct sk_buff *)PT_REGS_PARM1(ctx));
}

static __always_inline int on_confirm_x(void *ctx, int ret)
{
	u64 skbp = 0, ctp = 0;
	if (!stash_pop(ST_CONFIRM, &skbp, &ctp) || !ctp)
		return 0;
	if (ret == NF_DROP) {
		struct ct_info ci = {};
		ct_read((struct nf_conn *)ctp, &ci);
		on_drop(ctx, CT_DROP_INSERT_FAILED, ctp, ci.netns, ci.zone, &ci.orig, &ci.reply,
			ci.status, ci.tcp_state);
		return 0;
	}
	/* Clash resolution (commit "netfilter: conntrack: introduce clash
	 * resolution on insertion race", 4.9) may hand the skb the existing
	 * entry: then nothing new entered the table. A dying entry is accepted
	 * without being inserted: IPS_CONFIRMED stays clear. */
	unsigned long nfct = 0;
	bpf_probe_read_kernel(&nfct, sizeof(nfct), &((struct sk_buff *)skbp)->_nfct);
	if ((nfct & CT_NFCT_PTRMASK) != ctp)
		return 0;
	if (!(ct_read_status((struct nf_conn *)ctp) & IPS_CONFIRMED))
		return 0;
	on_new(ctx, ctp);
	return 0;
}

int confirm_x(struct pt_regs *ctx)
{
	return on_confirm_x(ctx, (int)PT_REGS_RC(ctx));
}

/* __nf_conntrack_alloc(net, zone, orig, repl, gfp, hash) -> ct or ERR_PTR.
 * ERR_PTR(-ENOMEM) after early_drop found nothing to evict = table full. */
int alloc_e(struct pt_regs *ctx)
{
	u64 net = PT_REGS_PARM1(ctx);
	u64 orig = PT_REGS_PARM3(ctx);
	stash_push(ST_ALLOC, net, orig);
	return 0;
}

static __always_inline int on_alloc_x(void *ctx, u64 rc)
{
	u64 net = 0, orig = 0;
	if (!stash_pop(ST_ALLOC, &net, &orig))
		return 0;
	if (!CT_IS_ERR(rc) || !orig)
		return 0;
	struct nf_conntrack_tuple t = {};
	bpf_probe_read_kernel(&t, sizeof(t), (void *)orig);
	tuple_clean(&t);
	on_drop(ctx, CT_DROP_TABLE_FULL, 0, net_inum((struct net *)net), 0, &t, NULL, 0, 0);
	return 0;
}

int alloc_x(struct pt_regs *ctx)
{
	return on_alloc_x(ctx, PT_REGS_RC(ctx));
}

/* ---------------------------------------------------------------- removal */

/* Is this task inside early_drop for the namespace of the entry going? early_drop
 * runs in the packet path: in a task's output path (preemptible on 7.2, so a
 * per-CPU tag could stay behind on a CPU the task left) or in a softirq. */
#define EARLY_DROP_FRESH_NS 1000000000ULL
static __always_inline int in_early_drop(u32 netns)
{
	struct ct_stash_key k = {.task = bpf_get_current_task(), .fn = ST_EARLY_DROP};
	u64 ns = 0, entered = 0;
	if (!stash_peek(&k, &ns, &entered))
		return 0;
	/* Entered within the last second: a tag whose return run the kernel skipped
	 * (counted) does not outlive that by more. */
	return (ns == netns || ns == 0) && bpf_ktime_get_ns() - entered < EARLY_DROP_FRESH_NS;
}

static __always_inline u8 removal_reason(struct ct_info *ci)
{
	if (in_early_drop(ci->netns)) {
#ifdef CT_HAVE_JIFFIES64
		/* early_drop_list also reaps the expired entries it meets; the
		 * kernel does not count those as early drops, nor does ctrace. */
		if (ct_jiffies_left(ci->timeout) <= 0)
			return CT_DESTROY_TIMEOUT;
#endif
		return CT_DESTROY_EARLY_DROP;
	}
	u64 id = bpf_get_current_pid_tgid();
	u32 *tr = task_reason.lookup(&id);
	if (tr && *tr)
		return (u8)*tr;
#ifdef CT_HAVE_JIFFIES64
	if (ct_jiffies_left(ci->timeout) <= 0)
		return CT_DESTROY_TIMEOUT;
	return CT_DESTROY_KILL;
#else
	return CT_DESTROY_UNKNOWN;
#endif
}

/* Report the removal of a confirmed entry exactly once. */
static __always_inline void on_removed(void *ctx, u64 ctp)
{
	if (!(ct_read_status((struct nf_conn *)ctp) & IPS_CONFIRMED))
		return;
	u8 one = 1;
	if (gone.insert(&ctp, &one) != 0)
		return; /* already reported */

	struct ct_info ci = {};
	u64 ts = ct_now_ns();
	ct_read((struct nf_conn *)ctp, &ci);
	u8 reason = removal_reason(&ci);

	u64 start = 0;
	u8 flags = 0;
	struct ct_live *lv = ctlive.lookup(&ctp);
	if (lv) {
		start = lv->start_ns;
		flags = CT_FLAG_START_KNOWN;
		ctlive.delete(&ctp);
	}
	struct ct_tkey k = {};
	tuple_unindex(&k, ci.netns, &ci.orig, ctp);
	if (ct_reply_natted(&ci))
		tuple_unindex(&k, ci.netns, &ci.reply, ctp);
	struct ct_ipval *v = ipval_get(ci.netns, &ci.orig);
	if (v)
		__sync_fetch_and_add(&v->destroyed[reason & (CT_NREASON - 1)], 1);

	produced_inc(CT_KIND_DESTROY);
	struct ct_event *e = ev_reserve();
	if (!e) {
		lost_inc(CT_LOST_OUTPUT);
		return;
	}
	ev_fill(e, CT_KIND_DESTROY, ts, ctp, &ci);
	e->reason = reason;
	e->start_boot_ns = start;
	e->flags = flags;
	ev_submit(ctx, e);
}

/* nf_ct_delete(ct, portid, report) -> bool: the removal choke point where it
 * is not inlined. IPS_DYING already set: someone else is removing it. */
static __always_inline int on_delete_e(void *ctx, u64 ctp)
{
	if (ct_read_status((struct nf_conn *)ctp) & IPS_DYING)
		return 0;
	on_removed(ctx, ctp);
	return 0;
}

int delete_e(struct pt_regs *ctx)
{
	return on_delete_e(ctx, PT_REGS_PARM1(ctx));
}

/* Entry free: destroy_conntrack(nfct) before 5.19, nf_ct_destroy(nfct) after
 * (the rename is detected by symbol, see kernel.py). nfct is the first member
 * of struct nf_conn. A confirmed entry is only freed after it left the table,
 * so this catches removals whose nf_ct_delete was inlined into its caller. */
static __always_inline int on_destroy_e(void *ctx, u64 ctp)
{
	on_removed(ctx, ctp);
	gone.delete(&ctp);
	return 0;
}

int destroy_e(struct pt_regs *ctx)
{
	return on_destroy_e(ctx, PT_REGS_PARM1(ctx));
}

static __always_inline void task_tag(u32 reason)
{
	u64 id = bpf_get_current_pid_tgid();
	task_reason.update(&id, &reason);
}

static __always_inline void task_untag(void)
{
	u64 id = bpf_get_current_pid_tgid();
	task_reason.delete(&id);
}

/* early_drop(net, hash): evicting to make room in net. */
static __always_inline int on_early_drop_e(void *net)
{
#ifdef CT_EARLY_DROP_CLONE
	net = NULL; /* a gcc clone (.isra) may pass other arguments: any namespace */
#endif
	stash_push(ST_EARLY_DROP, net_inum((struct net *)net), bpf_ktime_get_ns());
	return 0;
}

static __always_inline int on_early_drop_x(void)
{
	u64 a, b;
	stash_pop(ST_EARLY_DROP, &a, &b);
	return 0;
}

int early_drop_e(struct pt_regs *ctx)
{
	return on_early_drop_e((void *)PT_REGS_PARM1(ctx));
}

int early_drop_x(struct pt_regs *ctx)
{
	return on_early_drop_x();
}

/* ctnetlink_del_conntrack: conntrack -D, and -F (flush) which it dispatches. */
int ctnl_del_e(struct pt_regs *ctx)
{
	task_tag(CT_DESTROY_DELETE);
	return 0;
}

/* nf_conntrack_cleanup_net_list: a network namespace is going away. */
int netns_e(struct pt_regs *ctx)
{
	task_tag(CT_DESTROY_NETNS);
	return 0;
}

int untag_x(struct pt_regs *ctx)
{
	task_untag();
	return 0;
}

/* ---------------------------------------------------------------- TCP state */

/* nf_conntrack_tcp_packet(ct, skb, dataoff, ctinfo, state) */
static __always_inline int on_tcp_e(u64 ctp)
{
	stash_push(ST_TCP, ctp, ct_read_state((struct nf_conn *)ctp));
	return 0;
}

int tcp_e(struct pt_regs *ctx)
{
	return on_tcp_e(PT_REGS_PARM1(ctx));
}

static __always_inline int on_tcp_x(void *ctx)
{
	u64 ctp = 0, old = 0;
	if (!stash_pop(ST_TCP, &ctp, &old) || !ctp)
		return 0;
	u8 now = ct_read_state((struct nf_conn *)ctp);
	if (now == (u8)old)
		return 0;
	/* Unconfirmed entries: NEW at confirm carries their state. */
	if (!(ct_read_status((struct nf_conn *)ctp) & IPS_CONFIRMED))
		return 0;
	produced_inc(CT_KIND_STATE);
	struct ct_event *e = ev_reserve();
	if (!e) {
		lost_inc(CT_LOST_OUTPUT);
		return 0;
	}
	struct ct_info ci = {};
	ct_read((struct nf_conn *)ctp, &ci);
	ev_fill(e, CT_KIND_STATE, ct_now_ns(), ctp, &ci);
	e->ct_state = now;
	e->ct_oldstate = (u8)old;
	struct ct_live *lv = ctlive.lookup(&ctp);
	if (lv) {
		e->start_boot_ns = lv->start_ns;
		e->flags = CT_FLAG_START_KNOWN;
	}
	ev_submit(ctx, e);
	return 0;
}

int tcp_x(struct pt_regs *ctx)
{
	return on_tcp_x(ctx);
}

/* ---------------------------------------------------------------- sockets */

#define CT_SK_TCP_CLOSE 7 /* kernel TCP_CLOSE */

static __always_inline int sk_is_v4mapped(u8 *a)
{
	u32 w0 = 0, w1 = 0, w2 = 0;
	__builtin_memcpy(&w0, a, 4);
	__builtin_memcpy(&w1, a + 4, 4);
	__builtin_memcpy(&w2, a + 8, 4);
	return w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff);
}

/* A local TCP socket reached CLOSE: if its conntrack entry is still
 * ESTABLISHED, the close never reached conntrack (FIN/RST lost or dropped):
 * the entry will linger for the established timeout. */
static __always_inline void on_sock_close(void *ctx, struct sock *sk, u8 oldstate)
{
	u16 proto = 0, family = 0;
	bpf_probe_read_kernel(&proto, sizeof(proto), &sk->sk_protocol);
	if (proto != IPPROTO_TCP)
		return;
	bpf_probe_read_kernel(&family, sizeof(family), &sk->__sk_common.skc_family);
	sockstat_inc(0);

	struct ct_tkey k = {};
	struct net *net = NULL;
#ifdef CONFIG_NET_NS
	bpf_probe_read_kernel(&net, sizeof(net), &sk->__sk_common.skc_net.net);
#endif
	k.netns = net_inum(net);
	k.proto = IPPROTO_TCP;
	/* The local port from inet_sport, as the tracepoint itself does: on the
	 * way to CLOSE the tracepoint fires from inet_sk_state_store() after
	 * tcp_set_state() unhashed the socket and inet_put_port() cleared
	 * skc_num (measured on 6.1: skc_num 0 at every CLOSE). */
	bpf_probe_read_kernel(&k.sport_be, sizeof(k.sport_be), &((struct inet_sock *)sk)->inet_sport);
	bpf_probe_read_kernel(&k.dport_be, sizeof(k.dport_be), &sk->__sk_common.skc_dport);
	if (family == AF_INET) {
		k.family = AF_INET;
		bpf_probe_read_kernel(k.src, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_probe_read_kernel(k.dst, 4, &sk->__sk_common.skc_daddr);
	} else if (family == AF_INET6) {
#if IS_ENABLED(CONFIG_IPV6)
		u8 s6[16] = {}, d6[16] = {};
		bpf_probe_read_kernel(s6, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_probe_read_kernel(d6, 16, &sk->__sk_common.skc_v6_daddr);
		if (sk_is_v4mapped(d6)) {
			k.family = AF_INET;
			__builtin_memcpy(k.src, s6 + 12, 4);
			__builtin_memcpy(k.dst, d6 + 12, 4);
		} else {
			k.family = AF_INET6;
			__builtin_memcpy(k.src, s6, 16);
			__builtin_memcpy(k.dst, d6, 16);
		}
#else
		return;
#endif
	} else {
		return;
	}

	/* The socket is the original direction's source (client) or its
	 * destination (server): try both orientations, in the socket's own
	 * namespace first, then in any namespace. */
	struct ct_tkey r = {};
	r.netns = k.netns;
	r.family = k.family;
	r.proto = k.proto;
	r.sport_be = k.dport_be;
	r.dport_be = k.sport_be;
	__builtin_memcpy(r.src, k.dst, 16);
	__builtin_memcpy(r.dst, k.src, 16);
	u64 *cur = tuples.lookup(&k);
	if (!cur)
		cur = tuples.lookup(&r);
	if (!cur) {
		k.netns = 0;
		r.netns = 0;
		cur = tuples_any.lookup(&k);
		if (!cur)
			cur = tuples_any.lookup(&r);
	}
	if (!cur)
		return;
	sockstat_inc(1);
	u64 ctp = *cur;
	if (ct_read_state((struct nf_conn *)ctp) != CT_TCP_ESTABLISHED)
		return;
	sockstat_inc(2);
	struct ct_live *lv = ctlive.lookup(&ctp);
	if (!lv || (lv->flags & CT_LIVE_ORPHANED))
		return;
	lv->flags |= CT_LIVE_ORPHANED;

	struct ct_info ci = {};
	ct_read((struct nf_conn *)ctp, &ci);
	struct ct_ipval *v = ipval_get(ci.netns, &ci.orig);
	if (v)
		__sync_fetch_and_add(&v->orphans, 1);
	produced_inc(CT_KIND_ORPHAN);
	struct ct_event *e = ev_reserve();
	if (!e) {
		lost_inc(CT_LOST_OUTPUT);
		return;
	}
	ev_fill(e, CT_KIND_ORPHAN, ct_now_ns(), ctp, &ci);
	e->start_boot_ns = lv->start_ns;
	e->flags = CT_FLAG_START_KNOWN;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->sk_oldstate = oldstate;
	e->sk_newstate = CT_SK_TCP_CLOSE;
	ev_submit(ctx, e);
}

/* raw tracepoint sock:inet_sock_set_state(sk, oldstate, newstate) */
int sock_state_rtp(struct bpf_raw_tracepoint_args *ctx)
{
	if ((int)ctx->args[2] != CT_SK_TCP_CLOSE)
		return 0;
	on_sock_close(ctx, (struct sock *)ctx->args[0], (u8)ctx->args[1]);
	return 0;
}

/* kprobe fallback: tcp_set_state(sk, state) */
int tcp_set_state_e(struct pt_regs *ctx)
{
	struct sock *sk = (struct sock *)PT_REGS_PARM1(ctx);
	if ((int)PT_REGS_PARM2(ctx) != CT_SK_TCP_CLOSE)
		return 0;
	u8 old = 0;
	bpf_probe_read_kernel(&old, sizeof(old), &sk->__sk_common.skc_state);
	on_sock_close(ctx, sk, old);
	return 0;
}

/* ---------------------------------------------------------------- fentry/fexit
 *
 * The same probes through BPF trampolines, for kernels whose modules have BTF
 * (/sys/kernel/btf/nf_conntrack, CONFIG_DEBUG_INFO_BTF_MODULES, 5.11) with a
 * bcc that attaches to module functions (MODULE_KFUNC_PROBE: bcc commit
 * "bcc: Add module kfunc/kretfunc support"; bcc's plain KFUNC_PROBE looks
 * only in vmlinux BTF and fails with ENOENT for a module function). Names are
 * kfunc__<module>__<function>; ctrace/kernel.py (fentry_programs) must agree.
 * bcc's auto-attach is off (live.py): each is loaded and attached only if the
 * plan chose it, and the plan falls back to the kprobe programs above if its
 * load fails. The program bodies are the kprobe ones.
 *
 * fexit sees the parameters, then the return value: a program that reads the
 * return value declares every parameter, and the plan checks the count
 * against the function's BTF prototype (kernel.py _FENTRY_VARIANTS). */
#if defined(CT_FENTRY) && defined(MODULE_KFUNC_PROBE)
MODULE_KFUNC_PROBE(nf_conntrack, __nf_conntrack_confirm, struct sk_buff *skb)
{
	return on_confirm_e(skb);
}

MODULE_KRETFUNC_PROBE(nf_conntrack, __nf_conntrack_confirm, struct sk_buff *skb, int ret)
{
	return on_confirm_x(ctx, ret);
}

MODULE_KFUNC_PROBE(nf_conntrack, __nf_conntrack_alloc, struct net *net, void *zone, void *orig)
{
	stash_push(ST_ALLOC, (u64)net, (u64)orig);
	return 0;
}

MODULE_KRETFUNC_PROBE(nf_conntrack, __nf_conntrack_alloc, struct net *net, void *zone, void *orig,
		      void *repl, u64 gfp, u64 hash, void *ret)
{
	return on_alloc_x(ctx, (u64)ret);
}

MODULE_KFUNC_PROBE(nf_conntrack, nf_ct_delete, struct nf_conn *ct)
{
	return on_delete_e(ctx, (u64)ct);
}

MODULE_KFUNC_PROBE(nf_conntrack, nf_ct_destroy, void *nfct)
{
	return on_destroy_e(ctx, (u64)nfct);
}

MODULE_KFUNC_PROBE(nf_conntrack, destroy_conntrack, void *nfct)
{
	return on_destroy_e(ctx, (u64)nfct);
}

MODULE_KFUNC_PROBE(nf_conntrack, early_drop, void *net)
{
	return on_early_drop_e(net);
}

MODULE_KRETFUNC_PROBE(nf_conntrack, early_drop, void *net)
{
	return on_early_drop_x();
}

MODULE_KFUNC_PROBE(nf_conntrack_netlink, ctnetlink_del_conntrack, void *a0)
{
	task_tag(CT_DESTROY_DELETE);
	return 0;
}

MODULE_KRETFUNC_PROBE(nf_conntrack_netlink, ctnetlink_del_conntrack, void *a0)
{
	task_untag();
	return 0;
}

MODULE_KFUNC_PROBE(nf_conntrack, nf_conntrack_cleanup_net_list, void *list)
{
	task_tag(CT_DESTROY_NETNS);
	return 0;
}

MODULE_KRETFUNC_PROBE(nf_conntrack, nf_conntrack_cleanup_net_list, void *list)
{
	task_untag();
	return 0;
}

MODULE_KFUNC_PROBE(nf_conntrack, nf_conntrack_tcp_packet, struct nf_conn *ct)
{
	return on_tcp_e((u64)ct);
}

MODULE_KRETFUNC_PROBE(nf_conntrack, nf_conntrack_tcp_packet, struct nf_conn *ct)
{
	return on_tcp_x(ctx);
}
#endif /* CT_FENTRY && MODULE_KFUNC_PROBE */
