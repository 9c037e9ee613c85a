// SPDX-License-Identifier: GPL-2.0-only
/*
 * nqlab_ct: the lab's helper module.
 *
 * Enables conntrack in init_net for IPv4 and IPv6 (nf_ct_netns_get(), what a ruleset using
 * conntrack would do), and, when queue >= 0, sends every UDP packet to NFQUEUE number "queue" at
 * POST_ROUTING with the highest priority (before conntrack's confirm), the way a userspace
 * NFQUEUE filter would. With bridge=1 it also enables conntrack for bridged packets
 * (nf_conntrack_bridge, which calls nf_confirm() directly on 5.3 to 6.1).
 */
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/module.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <net/net_namespace.h>
#include <net/netfilter/nf_conntrack.h>

static int queue = -1;
module_param(queue, int, 0444);
MODULE_PARM_DESC(queue, "NFQUEUE number for all UDP at POST_ROUTING (-1: do not queue)");

static bool bridge;
module_param(bridge, bool, 0444);
MODULE_PARM_DESC(bridge, "Also enable conntrack for bridged packets (nf_conntrack_bridge)");

static bool nqlab_have_v6;
static bool nqlab_have_br;
static bool nqlab_hooks_on;

static unsigned int nqlab_queue_v4(void *priv, struct sk_buff *skb,
				   const struct nf_hook_state *state)
{
	if (ip_hdr(skb)->protocol != IPPROTO_UDP)
		return NF_ACCEPT;
	return NF_QUEUE_NR(queue);
}

static unsigned int nqlab_queue_v6(void *priv, struct sk_buff *skb,
				   const struct nf_hook_state *state)
{
	if (ipv6_hdr(skb)->nexthdr != IPPROTO_UDP)
		return NF_ACCEPT;
	return NF_QUEUE_NR(queue);
}

static const struct nf_hook_ops nqlab_ops[] = {
	{
		.hook = nqlab_queue_v4,
		.pf = NFPROTO_IPV4,
		.hooknum = NF_INET_POST_ROUTING,
		.priority = NF_IP_PRI_FIRST,
	},
	{
		.hook = nqlab_queue_v6,
		.pf = NFPROTO_IPV6,
		.hooknum = NF_INET_POST_ROUTING,
		.priority = NF_IP6_PRI_FIRST,
	},
};

static int __init nqlab_init(void)
{
	int ret;

	ret = nf_ct_netns_get(&init_net, NFPROTO_IPV4);
	if (ret) {
		pr_err("nqlab_ct: nf_ct_netns_get(ipv4) failed: %d\n", ret);
		return ret;
	}
	ret = nf_ct_netns_get(&init_net, NFPROTO_IPV6);
	if (ret)
		pr_warn("nqlab_ct: nf_ct_netns_get(ipv6) failed: %d\n", ret);
	nqlab_have_v6 = ret == 0;
	if (bridge) {
		ret = nf_ct_netns_get(&init_net, NFPROTO_BRIDGE);
		if (ret)
			pr_warn("nqlab_ct: nf_ct_netns_get(bridge) failed: %d\n", ret);
		nqlab_have_br = ret == 0;
	}

	if (queue >= 0) {
		if (queue > 65535) {
			ret = -EINVAL;
			goto err;
		}
		ret = nf_register_net_hooks(&init_net, nqlab_ops, ARRAY_SIZE(nqlab_ops));
		if (ret) {
			pr_err("nqlab_ct: nf_register_net_hooks failed: %d\n", ret);
			goto err;
		}
		nqlab_hooks_on = true;
	}
	pr_info("nqlab_ct: conntrack enabled (ipv4, %s), queue %d\n",
		nqlab_have_v6 ? "ipv6" : "no ipv6", queue);
	return 0;
err:
	if (nqlab_have_br)
		nf_ct_netns_put(&init_net, NFPROTO_BRIDGE);
	if (nqlab_have_v6)
		nf_ct_netns_put(&init_net, NFPROTO_IPV6);
	nf_ct_netns_put(&init_net, NFPROTO_IPV4);
	return ret;
}

static void __exit nqlab_exit(void)
{
	if (nqlab_hooks_on)
		nf_unregister_net_hooks(&init_net, nqlab_ops, ARRAY_SIZE(nqlab_ops));
	if (nqlab_have_br)
		nf_ct_netns_put(&init_net, NFPROTO_BRIDGE);
	if (nqlab_have_v6)
		nf_ct_netns_put(&init_net, NFPROTO_IPV6);
	nf_ct_netns_put(&init_net, NFPROTO_IPV4);
}

module_init(nqlab_init);
module_exit(nqlab_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("nqgen lab: enable conntrack in init_net and optionally queue UDP");
