/* SPDX-License-Identifier: GPL-2.0 */
/*
 * {{ cookiecutter.module_name }}: what differs between kernel generations,
 * decided by nqgen from the target's own headers and symbols.
 *
 * Target: {{ cookiecutter.target.release }}, confirm generation {{ cookiecutter.target.generation }},
 * hook functions in the "{{ cookiecutter.target.hookfn_form }}" form, "{{ cookiecutter.target.registration }}" registration,
 * hook storage "{{ cookiecutter.target.hook_storage }}", upstream fix present: {{ "yes" if cookiecutter.target.fix_present else "no" }}.
 */
#ifndef NQ_COMPAT_H
#define NQ_COMPAT_H

#include <linux/module.h>
#include <linux/netdevice.h>
#include <linux/skbuff.h>
#include <linux/netfilter.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/nf_conntrack_core.h>
{%- if cookiecutter.target.hookfn_form == "okfn" %}

/*
 * READ_ONCE() and WRITE_ONCE() came with upstream 3.19; the early RHEL 7
 * trees of this hook form may predate their backport (ACCESS_ONCE() is
 * there in every 3.10).
 */
#ifndef READ_ONCE
#define READ_ONCE(x) ACCESS_ONCE(x)
#define WRITE_ONCE(x, val) (ACCESS_ONCE(x) = (val))
#endif
{%- endif %}

/* The conntrack entry attached to @skb, or NULL. */
static inline struct nf_conn *nq_skb_ct(const struct sk_buff *skb)
{
{%- if cookiecutter.target.skb_nfct_accessor %}
	return (struct nf_conn *)skb_nfct(skb);
{%- else %}
	return (struct nf_conn *)skb->{{ cookiecutter.target.skb_nfct_field }};
{%- endif %}
}

/*
 * True when the original confirm leaves the packet alone: an l3mdev (VRF)
 * master at POST_ROUTING. The confirm happens on the real device's pass.
 */
static inline bool nq_in_vrf_postrouting(unsigned int hooknum,
					 const struct net_device *out)
{
{%- if cookiecutter.target.confirm_has_vrf_check %}
	return hooknum == NF_INET_POST_ROUTING && out &&
	       netif_is_l3_master(out);
{%- else %}
	/* this kernel's confirm has no VRF check */
	return false;
{%- endif %}
}

/*
 * Register @n hook ops {% if cookiecutter.target.registration == "pernet" %}in every network namespace, present and future
 * (a pernet_operations does both){% else %}globally (this kernel has one hook table){% endif %}; undo with nq_hooks_unregister().
 */
int nq_hooks_register(struct nf_hook_ops *ops, unsigned int n);
void nq_hooks_unregister(void);

#endif /* NQ_COMPAT_H */
