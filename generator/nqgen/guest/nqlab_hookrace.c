// SPDX-License-Identifier: GPL-2.0-only
/*
 * nqlab_hookrace: the lab's helper for the hook-swap scenarios (4.16+ nf_hook_entries kernels).
 *
 * race=1 starts a kthread that registers and unregisters a no-op hook at IPv4 POST_ROUTING of
 * init_net in a loop. Each registration copies that table, conntrack's confirm slot included, in
 * nf_hook_entries_grow() and publishes the copy afterwards. A kretprobe on nf_hook_entries_grow()
 * wakes a SCHED_FIFO kthread on the same CPU that spins for delay_ms: on a fully preemptible
 * kernel (boot with preempt=full) the registration is preempted between the copy and the publish,
 * holding nf_hook_mutex, which no RCU grace period waits for. race=1 also records the hook
 * addresses of init_net that belong to module "watch" (the mitigation, loaded). race=0 stops the
 * loop (the last registration publishes), then checks every IPv4/IPv6 hook table of init_net: a
 * hook at a recorded address after the module was unloaded, or at an address sprint_symbol()
 * cannot name, points into freed module text; it is counted in "stale" and printed.
 *
 * Writing measure=1 from a process in a fresh network namespace enables conntrack there
 * (nf_ct_netns_get(), what the first conntrack rule of a new container does) and measures in
 * window_us how long its IPv4 POST_ROUTING confirm slot still calls the function its ops
 * registered (the original confirm) after the registration returned: 0 when it was already
 * swapped, -1 when it still was not after limit_ms. family=6 measures IPv6 instead
 * (nf_ct_netns_get(NFPROTO_IPV6) and its POST_ROUTING confirm slot). Each measure puts
 * conntrack back, so a second measure in the same namespace measures conntrack's hooks
 * registered again on demand there.
 *
 * fake_confirm=1 (at load) registers a no-op hook at conntrack's confirm priority in init_net: what
 * a kernel whose confirm slots hold addresses hook-swap cannot recognise (CFI jump tables) shows.
 */
#include <linux/delay.h>
#include <linux/err.h>
#include <linux/kallsyms.h>
#include <linux/kprobes.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <linux/nsproxy.h>
#include <linux/ptrace.h>
#include <linux/sched.h>
#include <linux/wait.h>
#include <net/net_namespace.h>
#include <net/netfilter/nf_conntrack.h>

static unsigned int delay_ms = 300;
module_param(delay_ms, uint, 0644);
MODULE_PARM_DESC(delay_ms, "how long the registration is held between copy and publish");

static unsigned int limit_ms = 3000;
module_param(limit_ms, uint, 0644);
MODULE_PARM_DESC(limit_ms, "measure: give up after this many ms");

static int stale;
module_param(stale, int, 0444);
MODULE_PARM_DESC(stale, "hooks of init_net pointing outside any symbol at the last race=0");

static unsigned int rounds;
module_param(rounds, uint, 0444);
MODULE_PARM_DESC(rounds, "registrations of the last race");

static unsigned int held;
module_param(held, uint, 0444);
MODULE_PARM_DESC(held, "registrations held between copy and publish in the last race");

static char *watch = "nq_hook_swap";
module_param(watch, charp, 0444);
MODULE_PARM_DESC(watch, "the module whose hook addresses race=1 records");

#define NQLAB_MAX_WATCHED 16
static unsigned long nqlab_watched[NQLAB_MAX_WATCHED];
static unsigned int nqlab_nwatched;
module_param_named(watched, nqlab_nwatched, uint, 0444);
MODULE_PARM_DESC(watched, "hook addresses of module watch recorded at the last race=1");

static unsigned int family = 4;
module_param(family, uint, 0644);
MODULE_PARM_DESC(family, "measure: 4 (IPv4) or 6 (IPv6)");

static long window_us = -2;
module_param(window_us, long, 0444);
MODULE_PARM_DESC(window_us, "measure: us the new confirm slot still ran the original (-1: until limit_ms)");

static bool fake_confirm;
module_param(fake_confirm, bool, 0444);
MODULE_PARM_DESC(fake_confirm, "register a no-op hook at the confirm priority in init_net");

static struct task_struct *nqlab_reg_task;
static struct task_struct *nqlab_hog_task;
static DECLARE_WAIT_QUEUE_HEAD(nqlab_hog_wq);
static atomic_t nqlab_hog_req = ATOMIC_INIT(0);
static bool nqlab_racing;
static bool nqlab_probe_on;

static unsigned int nqlab_noop(void *priv, struct sk_buff *skb,
			       const struct nf_hook_state *state)
{
	return NF_ACCEPT;
}

static const struct nf_hook_ops nqlab_noop_ops = {
	.hook = nqlab_noop,
	.pf = NFPROTO_IPV4,
	.hooknum = NF_INET_POST_ROUTING,
	.priority = 0,
};

static unsigned int nqlab_fake(void *priv, struct sk_buff *skb,
			       const struct nf_hook_state *state)
{
	return NF_ACCEPT;
}

static const struct nf_hook_ops nqlab_fake_ops = {
	.hook = nqlab_fake,
	.pf = NFPROTO_IPV4,
	.hooknum = NF_INET_POST_ROUTING,
	.priority = NF_IP_PRI_CONNTRACK_CONFIRM,
};

static int nqlab_grow_ret(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	void *e = (void *)regs_return_value(regs);

	if (current != READ_ONCE(nqlab_reg_task) || IS_ERR_OR_NULL(e))
		return 0;
	held++;
	atomic_set(&nqlab_hog_req, 1);
	wake_up(&nqlab_hog_wq);
	return 0;
}

static struct kretprobe nqlab_grow_probe = {
	.kp.symbol_name = "nf_hook_entries_grow",
	.handler = nqlab_grow_ret,
};

static int nqlab_hog(void *arg)
{
	while (!kthread_should_stop()) {
		unsigned long end;

		wait_event_interruptible(nqlab_hog_wq,
					 atomic_read(&nqlab_hog_req) || kthread_should_stop());
		if (!atomic_xchg(&nqlab_hog_req, 0))
			continue;
		end = jiffies + msecs_to_jiffies(READ_ONCE(delay_ms));
		while (time_before(jiffies, end) && !kthread_should_stop())
			cpu_relax();
	}
	return 0;
}

static int nqlab_registrant(void *arg)
{
	while (!kthread_should_stop()) {
		if (!nf_register_net_hook(&init_net, &nqlab_noop_ops)) {
			nf_unregister_net_hook(&init_net, &nqlab_noop_ops);
			rounds++;
		}
		usleep_range(500, 1000);
	}
	return 0;
}

static bool nqlab_is_watched(unsigned long addr)
{
	unsigned int i;

	for (i = 0; i < nqlab_nwatched; i++)
		if (nqlab_watched[i] == addr)
			return true;
	return false;
}

/*
 * @record: remember the addresses in module "watch"; else count the hooks
 * at a remembered address or at one no symbol covers.
 */
static int nqlab_scan_head(struct nf_hook_entries __rcu **head, const char *family,
			   unsigned int hooknum, bool record)
{
	char sym[KSYM_SYMBOL_LEN], tag[MODULE_NAME_LEN + 3];
	struct nf_hook_entries *e;
	unsigned int i;
	int bad = 0;

	snprintf(tag, sizeof(tag), "[%s]", watch);
	rcu_read_lock();
	e = rcu_dereference(*head);
	for (i = 0; e && i < e->num_hook_entries; i++) {
		unsigned long addr = (unsigned long)READ_ONCE(e->hooks[i].hook);

		sprint_symbol(sym, addr);
		if (record) {
			if (strstr(sym, tag) && !nqlab_is_watched(addr) &&
			    nqlab_nwatched < NQLAB_MAX_WATCHED)
				nqlab_watched[nqlab_nwatched++] = addr;
			continue;
		}
		if (!nqlab_is_watched(addr) && strncmp(sym, "0x", 2))
			continue;
		pr_err("nqlab_hookrace: stale hook in init_net %s hook %u slot %u: %lx (%s)\n",
		       family, hooknum, i, addr, sym);
		bad++;
	}
	rcu_read_unlock();
	return bad;
}

static int nqlab_scan_init_net(bool record)
{
	unsigned int h;
	int bad = 0;

	for (h = 0; h < NF_INET_NUMHOOKS; h++) {
		bad += nqlab_scan_head(&init_net.nf.hooks_ipv4[h], "ipv4", h, record);
		bad += nqlab_scan_head(&init_net.nf.hooks_ipv6[h], "ipv6", h, record);
	}
	return bad;
}

static void nqlab_race_stop(void)
{
	if (!nqlab_racing)
		return;
	/* the registrant finishes its round: a held table is published first */
	kthread_stop(nqlab_reg_task);
	WRITE_ONCE(nqlab_reg_task, NULL);
	kthread_stop(nqlab_hog_task);
	nqlab_hog_task = NULL;
	nqlab_racing = false;
	stale = nqlab_scan_init_net(false);
	pr_info("nqlab_hookrace: race stopped after %u registration(s), %u held, %d stale hook(s)\n",
		rounds, held, stale);
}

static int nqlab_race_start(void)
{
	unsigned int cpu = num_online_cpus() > 1 ? 1 : 0;
	struct task_struct *reg, *hog;

	if (nqlab_racing)
		return 0;
	if (!nqlab_probe_on)
		return -ENOENT;
	rounds = 0;
	held = 0;
	stale = 0;
	nqlab_nwatched = 0;
	nqlab_scan_init_net(true);
	pr_info("nqlab_hookrace: %u hook address(es) of %s recorded\n", nqlab_nwatched, watch);
	hog = kthread_create(nqlab_hog, NULL, "nqlab_hog");
	if (IS_ERR(hog))
		return PTR_ERR(hog);
	reg = kthread_create(nqlab_registrant, NULL, "nqlab_reg");
	if (IS_ERR(reg)) {
		kthread_stop(hog);
		return PTR_ERR(reg);
	}
	kthread_bind(hog, cpu);
	kthread_bind(reg, cpu);
	sched_set_fifo(hog);
	nqlab_hog_task = hog;
	WRITE_ONCE(nqlab_reg_task, reg);
	nqlab_racing = true;
	wake_up_process(hog);
	wake_up_process(reg);
	return 0;
}

static int nqlab_race_set(const char *val, const struct kernel_param *kp)
{
	bool on;
	int ret = kstrtobool(val, &on);

	if (ret)
		return ret;
	if (on)
		return nqlab_race_start();
	nqlab_race_stop();
	return 0;
}

static const struct kernel_param_ops nqlab_race_ops = {
	.set = nqlab_race_set,
	.get = param_get_bool,
};

module_param_cb(race, &nqlab_race_ops, &nqlab_racing, 0644);
MODULE_PARM_DESC(race, "1: start registrations held between copy and publish; 0: stop and check");

/* True when the confirm slot of POST_ROUTING (@pf) in @net calls another function than its ops. */
static int nqlab_confirm_swapped(struct net *net, u8 pf)
{
	struct nf_hook_entries *e = NULL;
	struct nf_hook_ops **ops;
	int found = -1;
	int prio;
	unsigned int i;

	rcu_read_lock();
	if (pf == NFPROTO_IPV4) {
		e = rcu_dereference(net->nf.hooks_ipv4[NF_INET_POST_ROUTING]);
		prio = NF_IP_PRI_CONNTRACK_CONFIRM;
	} else {
#if IS_ENABLED(CONFIG_IPV6)
		e = rcu_dereference(net->nf.hooks_ipv6[NF_INET_POST_ROUTING]);
#endif
		prio = NF_IP6_PRI_LAST;
	}
	if (e) {
		ops = nf_hook_entries_get_hook_ops(e);
		for (i = 0; i < e->num_hook_entries; i++) {
			if (ops[i]->priority != prio)
				continue;
			found = READ_ONCE(e->hooks[i].hook) != ops[i]->hook;
			break;
		}
	}
	rcu_read_unlock();
	return found;
}

static int nqlab_measure_set(const char *val, const struct kernel_param *kp)
{
	struct net *net = get_net(current->nsproxy->net_ns);
	u8 pf = READ_ONCE(family) == 6 ? NFPROTO_IPV6 : NFPROTO_IPV4;
	bool first = true;
	u64 start, limit;
	int ret, swapped;

	window_us = -2;
	ret = nf_ct_netns_get(net, pf);
	if (ret)
		goto out;
	start = ktime_get_ns();
	limit = (u64)READ_ONCE(limit_ms) * NSEC_PER_MSEC;
	window_us = -1;
	for (;;) {
		u64 now = ktime_get_ns();

		swapped = nqlab_confirm_swapped(net, pf);
		if (swapped < 0) {
			ret = -ENOENT;
			break;
		}
		if (swapped) {
			window_us = first ? 0 : div_u64(now - start, NSEC_PER_USEC);
			break;
		}
		if (now - start > limit)
			break;
		first = false;
		usleep_range(200, 400);
	}
	pr_info("nqlab_hookrace: IPv%u confirm slot of a new registration swapped after %ld us\n",
		pf == NFPROTO_IPV6 ? 6 : 4, window_us);
	nf_ct_netns_put(net, pf);
out:
	put_net(net);
	return ret;
}

static const struct kernel_param_ops nqlab_measure_ops = {
	.set = nqlab_measure_set,
};

module_param_cb(measure, &nqlab_measure_ops, NULL, 0200);
MODULE_PARM_DESC(measure, "write 1 in a fresh netns: enable conntrack there and measure window_us");

static int __init nqlab_init(void)
{
	int ret;

	if (fake_confirm) {
		ret = nf_register_net_hook(&init_net, &nqlab_fake_ops);
		if (ret)
			return ret;
	}
	ret = register_kretprobe(&nqlab_grow_probe);
	nqlab_probe_on = ret == 0;
	if (ret)
		pr_warn("nqlab_hookrace: kretprobe on nf_hook_entries_grow: %d (race unavailable)\n", ret);
	return 0;
}

static void __exit nqlab_exit(void)
{
	nqlab_race_stop();
	if (nqlab_probe_on)
		unregister_kretprobe(&nqlab_grow_probe);
	if (fake_confirm)
		nf_unregister_net_hook(&init_net, &nqlab_fake_ops);
}

module_init(nqlab_init);
module_exit(nqlab_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("nqgen lab: hold hook registrations between copy and publish; measure the hook-swap window");
