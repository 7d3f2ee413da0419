/* ctrace kernel-difference shims for bpf/ctrace.bpf.c.
 *
 * Every difference between kernels is decided in user space by feature
 * detection (ctrace/kernel.py builds a ProbePlan) and reaches this file as a
 * -D flag. Nothing here compares kernel version numbers. Each shim names the
 * kernel change it handles.
 */
#ifndef CTRACE_COMPAT_H
#define CTRACE_COMPAT_H

/* Timestamps: bpf_ktime_get_boot_ns() arrived in 5.8 (commit 71d19214776e,
 * "bpf: add bpf_ktime_get_boot_ns()"). Without it the monotonic clock is used
 * and user space is told through the plan (it differs by time suspended). */
static __always_inline u64 ct_now_ns(void)
{
#ifdef CT_HAVE_BOOT_NS
	return bpf_ktime_get_boot_ns();
#else
	return bpf_ktime_get_ns();
#endif
}

/* Remaining lifetime of an entry in jiffies (negative: expired).
 * bpf_jiffies64() arrived in 5.5 (commit 5576b991e9c1, "bpf: Add BPF_FUNC_jiffies64").
 * ct->timeout is an absolute u32 jiffies value since 4.11 (commit
 * f330a7fdbe16, "netfilter: conntrack: get rid of conntrack timer"). */
static __always_inline s32 ct_jiffies_left(u32 timeout)
{
#ifdef CT_HAVE_JIFFIES64
	return (s32)(timeout - (u32)bpf_jiffies64());
#else
	return 1; /* unknown: never treated as expired */
#endif
}

/* Event output (ring buffer or perf buffer) lives in ctrace.bpf.c: bcc
 * rewrites map method calls only in the main text, not in included headers. */

#endif /* CTRACE_COMPAT_H */
