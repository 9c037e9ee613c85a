// SPDX-License-Identifier: GPL-2.0-only
/*
 * nqlab_detect: the lab's stale-use detector, for kernels where KASAN cannot see the bug
 * (3.10 has no KASAN; stock 4.18 frees the loser's extension with kfree_rcu, and KASAN does
 * not poison the SLAB_TYPESAFE_BY_RCU conntrack cache).
 *
 * - A kretprobe on __nf_conntrack_confirm(skb) counts clashes: it returned NF_ACCEPT and the
 *   skb's conntrack entry is no longer the one it had on entry (the clash resolution switched
 *   it to the winner and released the loser). The loser is remembered per CPU.
 * - A kprobe on nf_ct_deliver_cached_events(ct) counts calls on an entry whose refcount is 0
 *   (a stale use: the released loser of a clash, what the unfixed inline confirm does) and
 *   first calls after a clash on the same CPU that get the entry the clash released.
 *
 * - Kprobes on nf_conntrack_alter_reply(ct, ...) and, when nf_nat is loaded,
 *   nf_nat_setup_info(ct, ...) count calls on an entry already confirmed (in
 *   the hash table): NAT set up after an early confirm. 3.10's
 *   nf_nat_setup_info() has no confirmed check and rewrites the reply tuple of
 *   the hashed entry through nf_conntrack_alter_reply(); 4.x+ returns early,
 *   so only the nf_nat_setup_info count moves there.
 *
 * Counts per family (IPv4, IPv6) as one JSON object in /sys/module/nqlab_detect/parameters/counts.
 * It only reads: nothing of the kernel's behaviour changes but timing. Lab only.
 *
 * Built by the lab with NQLAB_CT_REFCOUNT_T when struct nf_conntrack's use is a refcount_t
 * (5.17+), else it is an atomic_t (3.10, 4.18); x86_64 only (arguments read from pt_regs).
 */
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/percpu.h>
#include <linux/ptrace.h>
#include <linux/skbuff.h>
#include <linux/socket.h>
#include <net/netfilter/nf_conntrack.h>

#ifndef CONFIG_X86_64
#error "nqlab_detect reads function arguments from x86_64 registers"
#endif

#define NQLAB_REPORTS 3

enum { NQLAB_V4, NQLAB_V6, NQLAB_NFAM };

static atomic_long_t nqlab_clashes[NQLAB_NFAM];
static atomic_long_t nqlab_stale[NQLAB_NFAM];
static atomic_long_t nqlab_loser[NQLAB_NFAM];
static atomic_long_t nqlab_calls;
static atomic_long_t nqlab_nat_confirmed[NQLAB_NFAM];
static atomic_long_t nqlab_alter_confirmed[NQLAB_NFAM];
static bool nqlab_nat_probed;
static atomic_t nqlab_reported;
static DEFINE_PER_CPU(struct nf_conn *, nqlab_last_loser);

struct nqlab_confirm_data {
	struct sk_buff *skb;
	struct nf_conn *ct;
	int fam;
};

static int nqlab_family(const struct nf_conn *ct)
{
	return nf_ct_l3num(ct) == AF_INET6 ? NQLAB_V6 : NQLAB_V4;
}

static unsigned int nqlab_ct_use(const struct nf_conn *ct)
{
#ifdef NQLAB_CT_REFCOUNT_T
	return refcount_read(&ct->ct_general.use);
#else
	return atomic_read(&ct->ct_general.use);
#endif
}

static int nqlab_confirm_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct nqlab_confirm_data *d = (struct nqlab_confirm_data *)ri->data;
	enum ip_conntrack_info ctinfo;

	d->skb = (struct sk_buff *)regs->di;
	d->ct = d->skb ? nf_ct_get(d->skb, &ctinfo) : NULL;
	d->fam = d->ct ? nqlab_family(d->ct) : NQLAB_V4;
	return 0;
}

static int nqlab_confirm_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct nqlab_confirm_data *d = (struct nqlab_confirm_data *)ri->data;
	enum ip_conntrack_info ctinfo;

	if ((int)regs_return_value(regs) != NF_ACCEPT || !d->ct)
		return 0;
	if (nf_ct_get(d->skb, &ctinfo) == d->ct)
		return 0;
	atomic_long_inc(&nqlab_clashes[d->fam]);
	this_cpu_write(nqlab_last_loser, d->ct);
	return 0;
}

static struct kretprobe nqlab_confirm_probe = {
	.kp.symbol_name = "__nf_conntrack_confirm",
	.entry_handler = nqlab_confirm_entry,
	.handler = nqlab_confirm_ret,
	.data_size = sizeof(struct nqlab_confirm_data),
	.maxactive = 64,
};

static int nqlab_deliver_pre(struct kprobe *p, struct pt_regs *regs)
{
	struct nf_conn *ct = (struct nf_conn *)regs->di;
	int fam;

	if (!ct)
		return 0;
	atomic_long_inc(&nqlab_calls);
	fam = nqlab_family(ct);
	/*
	 * The inline confirm delivers right after __nf_conntrack_confirm() returns NF_ACCEPT:
	 * only the first delivery on this CPU after a clash is compared (a later entry may
	 * reuse the loser's memory).
	 */
	if (ct == this_cpu_xchg(nqlab_last_loser, NULL))
		atomic_long_inc(&nqlab_loser[fam]);
	if (nqlab_ct_use(ct) != 0)
		return 0;
	atomic_long_inc(&nqlab_stale[fam]);
	if (atomic_inc_return(&nqlab_reported) <= NQLAB_REPORTS)
		pr_err("nqlab_detect: stale use: nf_ct_deliver_cached_events() on a released ipv%d entry (refcount 0), called from %pS\n",
		       fam == NQLAB_V6 ? 6 : 4, (void *)*(unsigned long *)regs->sp);
	return 0;
}

static struct kprobe nqlab_deliver_probe = {
	.symbol_name = "nf_ct_deliver_cached_events",
	.pre_handler = nqlab_deliver_pre,
};

static void nqlab_confirmed_use(struct nf_conn *ct, atomic_long_t *count, const char *what)
{
	int fam;

	if (!ct || !nf_ct_is_confirmed(ct))
		return;
	fam = nqlab_family(ct);
	atomic_long_inc(&count[fam]);
	if (atomic_inc_return(&nqlab_reported) <= NQLAB_REPORTS)
		pr_err("nqlab_detect: %s() on a confirmed ipv%d entry (already hashed)\n",
		       what, fam == NQLAB_V6 ? 6 : 4);
}

static int nqlab_nat_pre(struct kprobe *p, struct pt_regs *regs)
{
	nqlab_confirmed_use((struct nf_conn *)regs->di, nqlab_nat_confirmed, "nf_nat_setup_info");
	return 0;
}

static int nqlab_alter_pre(struct kprobe *p, struct pt_regs *regs)
{
	nqlab_confirmed_use((struct nf_conn *)regs->di, nqlab_alter_confirmed,
			    "nf_conntrack_alter_reply");
	return 0;
}

static struct kprobe nqlab_nat_probe = {
	.symbol_name = "nf_nat_setup_info",
	.pre_handler = nqlab_nat_pre,
};

static struct kprobe nqlab_alter_probe = {
	.symbol_name = "nf_conntrack_alter_reply",
	.pre_handler = nqlab_alter_pre,
};

static int nqlab_counts_get(char *buf, const struct kernel_param *kp)
{
	return scnprintf(buf, PAGE_SIZE,
			 "{\"clashes\":[%ld,%ld],\"stale\":[%ld,%ld],\"loser\":[%ld,%ld],\"calls\":%ld,\"missed\":%lu,\"nat_probe\":%s,\"nat_confirmed\":[%ld,%ld],\"alter_confirmed\":[%ld,%ld]}\n",
			 atomic_long_read(&nqlab_clashes[NQLAB_V4]),
			 atomic_long_read(&nqlab_clashes[NQLAB_V6]),
			 atomic_long_read(&nqlab_stale[NQLAB_V4]),
			 atomic_long_read(&nqlab_stale[NQLAB_V6]),
			 atomic_long_read(&nqlab_loser[NQLAB_V4]),
			 atomic_long_read(&nqlab_loser[NQLAB_V6]),
			 atomic_long_read(&nqlab_calls),
			 (unsigned long)nqlab_confirm_probe.nmissed + nqlab_deliver_probe.nmissed,
			 nqlab_nat_probed ? "true" : "false",
			 atomic_long_read(&nqlab_nat_confirmed[NQLAB_V4]),
			 atomic_long_read(&nqlab_nat_confirmed[NQLAB_V6]),
			 atomic_long_read(&nqlab_alter_confirmed[NQLAB_V4]),
			 atomic_long_read(&nqlab_alter_confirmed[NQLAB_V6]));
}

static int nqlab_counts_set(const char *val, const struct kernel_param *kp)
{
	return -EPERM;
}

static const struct kernel_param_ops nqlab_counts_ops = {
	.set = nqlab_counts_set,
	.get = nqlab_counts_get,
};

module_param_cb(counts, &nqlab_counts_ops, NULL, 0444);
MODULE_PARM_DESC(counts, "clashes, stale uses, deliveries to the last loser (per family), calls, missed probes");

static int __init nqlab_detect_init(void)
{
	int ret;

	ret = register_kretprobe(&nqlab_confirm_probe);
	if (ret) {
		pr_err("nqlab_detect: kretprobe on __nf_conntrack_confirm failed: %d\n", ret);
		return ret;
	}
	ret = register_kprobe(&nqlab_deliver_probe);
	if (ret) {
		pr_err("nqlab_detect: kprobe on nf_ct_deliver_cached_events failed: %d\n", ret);
		unregister_kretprobe(&nqlab_confirm_probe);
		return ret;
	}
	ret = register_kprobe(&nqlab_alter_probe);
	if (ret) {
		pr_err("nqlab_detect: kprobe on nf_conntrack_alter_reply failed: %d\n", ret);
		unregister_kprobe(&nqlab_deliver_probe);
		unregister_kretprobe(&nqlab_confirm_probe);
		return ret;
	}
	/* nf_nat is loaded only where NAT is in use: probed when it is there */
	nqlab_nat_probed = register_kprobe(&nqlab_nat_probe) == 0;
	pr_info("nqlab_detect: probing __nf_conntrack_confirm, nf_ct_deliver_cached_events, nf_conntrack_alter_reply%s\n",
		nqlab_nat_probed ? ", nf_nat_setup_info" : "");
	return 0;
}

static void __exit nqlab_detect_exit(void)
{
	/* each waits for running handlers (synchronize_sched / RCU) before returning */
	if (nqlab_nat_probed)
		unregister_kprobe(&nqlab_nat_probe);
	unregister_kprobe(&nqlab_alter_probe);
	unregister_kprobe(&nqlab_deliver_probe);
	unregister_kretprobe(&nqlab_confirm_probe);
}

module_init(nqlab_detect_init);
module_exit(nqlab_detect_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("nqgen lab: count conntrack clashes and event deliveries to released entries");
