/* SPDX-License-Identifier: GPL-2.0 */
/*
 * {{ cookiecutter.module_name }}: nqgen's corrected conntrack confirm for
 * this kernel (confirm generation {{ cookiecutter.target.generation }}).
 *
 * The kernel's inline nf_conntrack_confirm() is never called: on kernels
 * without the upstream fix ("netfilter: conntrack: re-fetch conntrack after
 * insertion") it keeps the old entry after __nf_conntrack_confirm() moved
 * the skb to the winner of an insertion clash and freed the loser, then
 * delivers cached events on the freed entry (CVE-2022-49561).
 *
 * Counters used here: confirm_calls, clashes, events_delivered,
 * confirm_drops.
 */
#ifndef NQ_CONFIRM_H
#define NQ_CONFIRM_H

#include "nq_compat.h"

/* The fixed inline confirm: re-reads the entry after insertion. */
int nq_confirm_fixed(struct sk_buff *skb);
{%- for name in cookiecutter.target.families | map(attribute="function") | unique %}

/* Corrected copy of {{ name }}(), same prototype as the original. */
{%- if cookiecutter.target.hookfn_form == "priv_state" %}
unsigned int nq_{{ name }}(void *priv, struct sk_buff *skb,
{{ "\t" * ((name | length + 17) // 8) }}{{ " " * ((name | length + 17) % 8) }}const struct nf_hook_state *state);
{%- elif cookiecutter.target.hookfn_form == "ops_state" %}
unsigned int nq_{{ name }}(const struct nf_hook_ops *ops, struct sk_buff *skb,
{{ "\t" * ((name | length + 17) // 8) }}{{ " " * ((name | length + 17) % 8) }}const struct net_device *in,
{{ "\t" * ((name | length + 17) // 8) }}{{ " " * ((name | length + 17) % 8) }}const struct net_device *out,
{{ "\t" * ((name | length + 17) // 8) }}{{ " " * ((name | length + 17) % 8) }}const struct nf_hook_state *state);
{%- else %}
unsigned int nq_{{ name }}(const struct nf_hook_ops *ops, struct sk_buff *skb,
{{ "\t" * ((name | length + 17) // 8) }}{{ " " * ((name | length + 17) % 8) }}const struct net_device *in,
{{ "\t" * ((name | length + 17) // 8) }}{{ " " * ((name | length + 17) % 8) }}const struct net_device *out,
{{ "\t" * ((name | length + 17) // 8) }}{{ " " * ((name | length + 17) % 8) }}int (*okfn)(struct sk_buff *));
{%- endif %}
{%- endfor %}
{%- if cookiecutter.target.generation == "G2" %}

/*
 * Corrected copy of the exported nf_confirm() (helper, sequence adjustment,
 * fixed confirm), same prototype: nf_conntrack_bridge calls it directly.
 */
unsigned int nq_nf_confirm(struct sk_buff *skb, unsigned int protoff,
			   struct nf_conn *ct, enum ip_conntrack_info ctinfo);
{%- endif %}

/*
 * Confirm ahead of the original confirm hook, but only where that changes
 * nothing else: the packet is not an l3mdev (VRF) pass the original leaves
 * alone{% if cookiecutter.target.generation != "G1" or cookiecutter.strategy == "advance-confirm-corrected" %}, and the entry has no helper and no sequence adjustment
 * (those must run before the confirm, and only once){% endif %}. Returns
 * false, doing nothing, for other entries; otherwise stores the corrected
 * confirm's verdict in *verdict and returns true. The original hook then
 * finds the entry confirmed and only delivers events for the entry on the
 * skb.
 */
bool nq_preconfirm(struct sk_buff *skb, unsigned int hooknum,
		   const struct net_device *out, unsigned int *verdict);

#endif /* NQ_CONFIRM_H */
