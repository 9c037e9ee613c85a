// SPDX-License-Identifier: GPL-2.0-only
/*
 * nqlab_ct: the lab's helper module.
 *
 * Makes sure conntrack sees the traffic of init_net for IPv4 and IPv6 and, when queue >= 0,
 * sends every UDP packet to NFQUEUE number "queue" at POST_ROUTING with the highest priority
 * (before conntrack's confirm), the way a userspace NFQUEUE filter would.
 *
 * The lab builds it against the target and passes, decided from the target's own headers
 * (nqgen.lab.guestapi):
 *   NQLAB_HOOK_PRIV_STATE / NQLAB_HOOK_OPS_STATE / NQLAB_HOOK_OKFN  the nf_hookfn form
 *   NQLAB_GLOBAL_HOOKS    one global hook table: nf_register_hooks() (3.10)
 *   NQLAB_OPS_OWNER       struct nf_hook_ops has .owner
 *   NQLAB_CT_NETNS_GET    nf_ct_netns_get() exists: conntrack registers its hooks only on
 *                         request (4.10+); without it, loading nf_conntrack_ipv4/ipv6 is enough
 * With bridge=1 it also enables conntrack for bridged packets (nf_conntrack_bridge, which calls
 * nf_confirm() directly on 5.3 to 6.1; NQLAB_CT_NETNS_GET kernels only).
 */
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/module.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <net/net_namespace.h>
#include <net/netfilter/nf_conntrack.h>

#if !defined(NQLAB_HOOK_PRIV_STATE) && !defined(NQLAB_HOOK_OPS_STATE) && !defined(NQLAB_HOOK_OKFN)
#error "build through nqgen lab: it passes the target's nf_hookfn form"
#endif

static int queue = -1;
module_param(queue, int, 0444);
MODULE_PARM_DESC(queue, "NFQUEUE number for all UDP at POST_ROUTING (-1: do not queue)");

static bool bridge;
module_param(bridge, bool, 0444);
MODULE_PARM_DESC(bridge, "Also enable conntrack for bridged packets (nf_conntrack_bridge)");

static bool nqlab_hooks_on;

static unsigned int nqlab_queue(struct sk_buff *skb, u8 pf)
{
	if (pf == NFPROTO_IPV4 && ip_hdr(skb)->protocol != IPPROTO_UDP)
		return NF_ACCEPT;
	if (pf == NFPROTO_IPV6 && ipv6_hdr(skb)->nexthdr != IPPROTO_UDP)
		return NF_ACCEPT;
	return NF_QUEUE_NR(queue);
}

#if defined(NQLAB_HOOK_PRIV_STATE)
static unsigned int nqlab_queue_v4(void *priv, struct sk_buff *skb,
				   const struct nf_hook_state *state)
{
	return nqlab_queue(skb, NFPROTO_IPV4);
}

static unsigned int nqlab_queue_v6(void *priv, struct sk_buff *skb,
				   const struct nf_hook_state *state)
{
	return nqlab_queue(skb, NFPROTO_IPV6);
}
#elif defined(NQLAB_HOOK_OPS_STATE)
static unsigned int nqlab_queue_v4(const struct nf_hook_ops *ops,
				   struct sk_buff *skb,
				   const struct net_device *in,
				   const struct net_device *out,
				   const struct nf_hook_state *state)
{
	return nqlab_queue(skb, NFPROTO_IPV4);
}

static unsigned int nqlab_queue_v6(const struct nf_hook_ops *ops,
				   struct sk_buff *skb,
				   const struct net_device *in,
				   const struct net_device *out,
				   const struct nf_hook_state *state)
{
	return nqlab_queue(skb, NFPROTO_IPV6);
}
#else
static unsigned int nqlab_queue_v4(const struct nf_hook_ops *ops,
				   struct sk_buff *skb,
				   const struct net_device *in,
				   const struct net_device *out,
				   int (*okfn)(struct sk_buff *))
{
	return nqlab_queue(skb, NFPROTO_IPV4);
}

static unsigned int nqlab_queue_v6(const struct nf_hook_ops *ops,
				   struct sk_buff *skb,
				   const struct net_device *in,
				   const struct net_device *out,
				   int (*okfn)(struct sk_buff *))
{
	return nqlab_queue(skb, NFPROTO_IPV6);
}
#endif

/* nf_register_hooks() of a global hook table takes the ops writable (it links them in) */
static struct nf_hook_ops nqlab_ops[] = {
	{
		.hook = nqlab_queue_v4,
#ifdef NQLAB_OPS_OWNER
		.owner = THIS_MODULE,
#endif
		.pf = NFPROTO_IPV4,
		.hooknum = NF_INET_POST_ROUTING,
		.priority = NF_IP_PRI_FIRST,
	},
	{
		.hook = nqlab_queue_v6,
#ifdef NQLAB_OPS_OWNER
		.owner = THIS_MODULE,
#endif
		.pf = NFPROTO_IPV6,
		.hooknum = NF_INET_POST_ROUTING,
		.priority = NF_IP6_PRI_FIRST,
	},
};

#ifdef NQLAB_GLOBAL_HOOKS
static int nqlab_register(void)
{
	return nf_register_hooks(nqlab_ops, ARRAY_SIZE(nqlab_ops));
}

static void nqlab_unregister(void)
{
	nf_unregister_hooks(nqlab_ops, ARRAY_SIZE(nqlab_ops));
}
#else
static int nqlab_register(void)
{
	return nf_register_net_hooks(&init_net, nqlab_ops, ARRAY_SIZE(nqlab_ops));
}

static void nqlab_unregister(void)
{
	nf_unregister_net_hooks(&init_net, nqlab_ops, ARRAY_SIZE(nqlab_ops));
}
#endif

#ifdef NQLAB_CT_NETNS_GET
static bool nqlab_have_v6;
static bool nqlab_have_br;

static int nqlab_ct_get(void)
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
	return 0;
}

static void nqlab_ct_put(void)
{
	if (nqlab_have_br)
		nf_ct_netns_put(&init_net, NFPROTO_BRIDGE);
	if (nqlab_have_v6)
		nf_ct_netns_put(&init_net, NFPROTO_IPV6);
	nf_ct_netns_put(&init_net, NFPROTO_IPV4);
}

static const char *nqlab_ct_how(void)
{
	return nqlab_have_v6 ? "nf_ct_netns_get ipv4 ipv6" : "nf_ct_netns_get ipv4 only";
}
#else
/* conntrack's hooks are global here and registered when nf_conntrack_ipv4/ipv6 load */
static int nqlab_ct_get(void)
{
	return 0;
}

static void nqlab_ct_put(void)
{
}

static const char *nqlab_ct_how(void)
{
	return "global hooks of nf_conntrack_ipv4/ipv6";
}
#endif

static int __init nqlab_init(void)
{
	int ret;

	if (queue > 65535)
		return -EINVAL;
	ret = nqlab_ct_get();
	if (ret)
		return ret;
	if (queue >= 0) {
		ret = nqlab_register();
		if (ret) {
			pr_err("nqlab_ct: registering the queue hooks failed: %d\n", ret);
			nqlab_ct_put();
			return ret;
		}
		nqlab_hooks_on = true;
	}
	pr_info("nqlab_ct: conntrack enabled (%s), queue %d\n", nqlab_ct_how(), queue);
	return 0;
}

static void __exit nqlab_exit(void)
{
	if (nqlab_hooks_on)
		nqlab_unregister();
	nqlab_ct_put();
}

module_init(nqlab_init);
module_exit(nqlab_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("nqgen lab: enable conntrack in init_net and optionally queue UDP");
