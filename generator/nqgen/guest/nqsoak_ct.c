// SPDX-License-Identifier: GPL-2.0-only
/*
 * nqsoak_ct: the soak's helper module.
 *
 * Uses conntrack in every network namespace (nf_ct_netns_get() from a pernet .init, put back in .exit),
 * so conntrack registers and unregisters its hooks as namespaces come and go; when queue >= 0, sends
 * every UDP packet of init_net to NFQUEUE "queue" at POST_ROUTING with the bypass flag, so a consumer
 * can come and go without dropping anything. /sys/module/nqsoak_ct/parameters/hooks lists init_net's
 * IPv4 and IPv6 hook entries (function and priority order), to compare before and after the soak.
 */
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <linux/rcupdate.h>
#include <net/net_namespace.h>
#include <net/netns/generic.h>
#include <net/netfilter/nf_conntrack.h>

static int queue = -1;
module_param(queue, int, 0444);
MODULE_PARM_DESC(queue, "NFQUEUE number (with bypass) for all UDP of init_net at POST_ROUTING (-1: none)");

static bool nqsoak_hooks_on;

static unsigned int nqsoak_queue_v4(void *priv, struct sk_buff *skb, const struct nf_hook_state *state)
{
	if (ip_hdr(skb)->protocol != IPPROTO_UDP)
		return NF_ACCEPT;
	return NF_QUEUE_NR(queue) | NF_VERDICT_FLAG_QUEUE_BYPASS;
}

static unsigned int nqsoak_queue_v6(void *priv, struct sk_buff *skb, const struct nf_hook_state *state)
{
	if (ipv6_hdr(skb)->nexthdr != IPPROTO_UDP)
		return NF_ACCEPT;
	return NF_QUEUE_NR(queue) | NF_VERDICT_FLAG_QUEUE_BYPASS;
}

static const struct nf_hook_ops nqsoak_ops[] = {
	{ .hook = nqsoak_queue_v4, .pf = NFPROTO_IPV4, .hooknum = NF_INET_POST_ROUTING,
	  .priority = NF_IP_PRI_FIRST },
	{ .hook = nqsoak_queue_v6, .pf = NFPROTO_IPV6, .hooknum = NF_INET_POST_ROUTING,
	  .priority = NF_IP6_PRI_FIRST },
};

struct nqsoak_net {
	bool v4;
	bool v6;
};

static unsigned int nqsoak_net_id __read_mostly;

static int __net_init nqsoak_net_init(struct net *net)
{
	struct nqsoak_net *sn = net_generic(net, nqsoak_net_id);

	sn->v4 = nf_ct_netns_get(net, NFPROTO_IPV4) == 0;
	sn->v6 = nf_ct_netns_get(net, NFPROTO_IPV6) == 0;
	return sn->v4 ? 0 : -ENOMEM;
}

static void __net_exit nqsoak_net_exit(struct net *net)
{
	struct nqsoak_net *sn = net_generic(net, nqsoak_net_id);

	if (sn->v6)
		nf_ct_netns_put(net, NFPROTO_IPV6);
	if (sn->v4)
		nf_ct_netns_put(net, NFPROTO_IPV4);
}

static struct pernet_operations nqsoak_net_ops = {
	.init = nqsoak_net_init,
	.exit = nqsoak_net_exit,
	.id = &nqsoak_net_id,
	.size = sizeof(struct nqsoak_net),
};

static int nqsoak_dump(char *buf, const char *fam, struct nf_hook_entries __rcu **heads, int n, int len)
{
	int h, i;

	rcu_read_lock();
	for (h = 0; h < n; h++) {
		struct nf_hook_entries *e = rcu_dereference(heads[h]);

		len += scnprintf(buf + len, PAGE_SIZE - len, "%s/%d:", fam, h);
		for (i = 0; e && i < e->num_hook_entries; i++)
			len += scnprintf(buf + len, PAGE_SIZE - len, " %ps", e->hooks[i].hook);
		len += scnprintf(buf + len, PAGE_SIZE - len, "\n");
	}
	rcu_read_unlock();
	return len;
}

static int nqsoak_hooks_get(char *buf, const struct kernel_param *kp)
{
	int len = nqsoak_dump(buf, "ipv4", init_net.nf.hooks_ipv4, NF_INET_NUMHOOKS, 0);

	return nqsoak_dump(buf, "ipv6", init_net.nf.hooks_ipv6, NF_INET_NUMHOOKS, len);
}

static const struct kernel_param_ops nqsoak_hooks_ops = { .get = nqsoak_hooks_get };
module_param_cb(hooks, &nqsoak_hooks_ops, NULL, 0444);
MODULE_PARM_DESC(hooks, "init_net's IPv4/IPv6 netfilter hook entries, in order");

static int __init nqsoak_init(void)
{
	int ret = register_pernet_subsys(&nqsoak_net_ops);

	if (ret)
		return ret;
	if (queue >= 0 && queue <= 65535) {
		ret = nf_register_net_hooks(&init_net, nqsoak_ops, ARRAY_SIZE(nqsoak_ops));
		if (ret) {
			unregister_pernet_subsys(&nqsoak_net_ops);
			return ret;
		}
		nqsoak_hooks_on = true;
	}
	pr_info("nqsoak_ct: conntrack in every netns, queue %d (bypass)\n", queue);
	return 0;
}

static void __exit nqsoak_exit(void)
{
	if (nqsoak_hooks_on)
		nf_unregister_net_hooks(&init_net, nqsoak_ops, ARRAY_SIZE(nqsoak_ops));
	unregister_pernet_subsys(&nqsoak_net_ops);
}

module_init(nqsoak_init);
module_exit(nqsoak_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("nqgen soak: conntrack in every netns, optional bypass queue, hook table dump");
