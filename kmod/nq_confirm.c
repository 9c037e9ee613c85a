// SPDX-License-Identifier: GPL-2.0
/*
 * {{ cookiecutter.module_name }}: nqgen's corrected conntrack confirm,
 * confirm generation {{ cookiecutter.target.generation }}:
{%- if cookiecutter.target.generation == "G1" %}
 * the confirm hook does the sequence adjustment (not for loopback), then the
 * inline confirm; helpers run in their own hook, earlier.
{%- elif cookiecutter.target.generation == "G2" %}
 * ipv4_confirm()/ipv6_confirm() find the protocol offset and call
 * nf_confirm(), which runs the helper, the sequence adjustment (not for
 * loopback), then the inline confirm.
{%- else %}
 * nf_confirm() is itself the hook for IPv4 and IPv6; it runs the helper,
 * the sequence adjustment (not for loopback), then the inline confirm.
{%- endif %}
 * Everything is re-implemented here with the re-read of the entry after
 * __nf_conntrack_confirm(), as in the upstream fix.
 */
#include <linux/kernel.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <net/ip.h>
#include <net/ipv6.h>
#include <net/netfilter/nf_conntrack.h>
#include <net/netfilter/nf_conntrack_core.h>
#include <net/netfilter/nf_conntrack_helper.h>
#include <net/netfilter/nf_conntrack_seqadj.h>
#include <net/netfilter/nf_conntrack_ecache.h>

#include "nq_compat.h"
#include "nq_confirm.h"
#include "nq_stats.h"

int nq_confirm_fixed(struct sk_buff *skb)
{
	struct nf_conn *ct = nq_skb_ct(skb);
	struct nf_conn *now;
	int ret;

	nq_count(confirm_calls);
{%- if cookiecutter.target.has_nf_ct_is_untracked %}
	if (!ct || nf_ct_is_untracked(ct))
{%- else %}
	if (!ct)
{%- endif %}
		return NF_ACCEPT;

	if (!nf_ct_is_confirmed(ct)) {
		ret = __nf_conntrack_confirm(skb);
		if (ret != NF_ACCEPT) {
			nq_count(confirm_drops);
			return ret;
		}
		/*
		 * The fix: clash resolution may have attached the winning
		 * entry to the skb and released ours. Use the skb's entry
		 * from here on; the old pointer may be freed memory.
		 */
		now = nq_skb_ct(skb);
		if (now != ct)
			nq_count(clashes);
		ct = now;
	}
{%- if cookiecutter.target.has_ecache_exist %}

	if (nf_ct_ecache_exist(ct)) {
		nf_ct_deliver_cached_events(ct);
		nq_count(events_delivered);
	}
{%- else %}

	nf_ct_deliver_cached_events(ct);
	nq_count(events_delivered);
{%- endif %}
	return NF_ACCEPT;
}

/* Sequence adjustment as the original does it; false means drop. */
static bool nq_seq_adjust(struct sk_buff *skb, struct nf_conn *ct,
			  enum ip_conntrack_info ctinfo, unsigned int protoff)
{
	if (!test_bit(IPS_SEQ_ADJUST_BIT, &ct->status) ||
	    nf_is_loopback_packet(skb))
		return true;
	if (nf_ct_seq_adjust(skb, ct, ctinfo, protoff))
		return true;
	NF_CT_STAT_INC_ATOMIC(nf_ct_net(ct), drop);
	return false;
}
{%- if cookiecutter.target.generation != "G1" %}

/* The entry's helper, if any: rcu_read_lock()ed by the hook caller. */
static const struct nf_conntrack_helper *nq_helper(const struct nf_conn *ct)
{
	const struct nf_conn_help *help = nfct_help(ct);

	return help ? rcu_dereference(help->helper) : NULL;
}
{%- endif %}
{%- if cookiecutter.target.generation == "G2" %}

/* nf_confirm(): helper, sequence adjustment, then the fixed confirm. */
static unsigned int nq_confirm_body(struct sk_buff *skb, unsigned int protoff,
				    struct nf_conn *ct,
				    enum ip_conntrack_info ctinfo)
{
	const struct nf_conntrack_helper *helper = nq_helper(ct);

	if (helper) {
		int ret = helper->help(skb, protoff, ct, ctinfo);

		if (ret != NF_ACCEPT)
			return ret;
	}
	if (!nq_seq_adjust(skb, ct, ctinfo, protoff))
		return NF_DROP;
	return nq_confirm_fixed(skb);
}

unsigned int nq_ipv4_confirm(void *priv, struct sk_buff *skb,
			     const struct nf_hook_state *state)
{
	enum ip_conntrack_info ctinfo;
	struct nf_conn *ct;

	ct = nf_ct_get(skb, &ctinfo);
	if (!ct || ctinfo == IP_CT_RELATED_REPLY)
		return nq_confirm_fixed(skb);

	if (nq_in_vrf_postrouting(state->hook, state->out))
		return NF_ACCEPT;

	return nq_confirm_body(skb, skb_network_offset(skb) + ip_hdrlen(skb),
			       ct, ctinfo);
}

unsigned int nq_ipv6_confirm(void *priv, struct sk_buff *skb,
			     const struct nf_hook_state *state)
{
	unsigned char pnum = ipv6_hdr(skb)->nexthdr;
	enum ip_conntrack_info ctinfo;
	struct nf_conn *ct;
	__be16 frag_off;
	int protoff;

	ct = nf_ct_get(skb, &ctinfo);
	if (!ct || ctinfo == IP_CT_RELATED_REPLY)
		return nq_confirm_fixed(skb);

	if (nq_in_vrf_postrouting(state->hook, state->out))
		return NF_ACCEPT;

	protoff = ipv6_skip_exthdr(skb, sizeof(struct ipv6hdr), &pnum,
				   &frag_off);
	if (protoff < 0 || (frag_off & htons(~0x7)) != 0)
		return nq_confirm_fixed(skb);

	return nq_confirm_body(skb, protoff, ct, ctinfo);
}

/* The exported nf_confirm() as the bridge's conntrack calls it. */
unsigned int nq_nf_confirm(struct sk_buff *skb, unsigned int protoff,
			   struct nf_conn *ct, enum ip_conntrack_info ctinfo)
{
	return nq_confirm_body(skb, protoff, ct, ctinfo);
}
{%- elif cookiecutter.target.generation == "G3" %}

unsigned int nq_nf_confirm(void *priv, struct sk_buff *skb,
			   const struct nf_hook_state *state)
{
	const struct nf_conntrack_helper *helper;
	enum ip_conntrack_info ctinfo;
	struct nf_conn *ct;
	bool seqadj_needed;
	__be16 frag_off;
	int protoff;
	u8 pnum;

	ct = nf_ct_get(skb, &ctinfo);
	if (!ct || nq_in_vrf_postrouting(state->hook, state->out))
		return NF_ACCEPT;

	helper = nq_helper(ct);
	seqadj_needed = test_bit(IPS_SEQ_ADJUST_BIT, &ct->status) &&
			!nf_is_loopback_packet(skb);
	if (!nfct_help(ct) && !seqadj_needed)
		return nq_confirm_fixed(skb);

	/* helper->help() does not expect ICMP packets */
	if (ctinfo == IP_CT_RELATED_REPLY)
		return nq_confirm_fixed(skb);

	switch (nf_ct_l3num(ct)) {
	case NFPROTO_IPV4:
		protoff = skb_network_offset(skb) + ip_hdrlen(skb);
		break;
	case NFPROTO_IPV6:
		pnum = ipv6_hdr(skb)->nexthdr;
		protoff = ipv6_skip_exthdr(skb, sizeof(struct ipv6hdr), &pnum,
					   &frag_off);
		if (protoff < 0 || (frag_off & htons(~0x7)) != 0)
			return nq_confirm_fixed(skb);
		break;
	default:
		return nq_confirm_fixed(skb);
	}

	if (helper) {
		int ret = helper->help(skb, protoff, ct, ctinfo);

		if (ret != NF_ACCEPT)
			return ret;
	}
	if (seqadj_needed && !nq_seq_adjust(skb, ct, ctinfo, protoff))
		return NF_DROP;
	return nq_confirm_fixed(skb);
}
{%- else %}
{%- for f in cookiecutter.target.families %}
{%- if cookiecutter.target.hookfn_form == "priv_state" %}

unsigned int nq_{{ f.function }}(void *priv, struct sk_buff *skb,
			     const struct nf_hook_state *state)
{%- elif cookiecutter.target.hookfn_form == "ops_state" %}

unsigned int nq_{{ f.function }}(const struct nf_hook_ops *ops, struct sk_buff *skb,
			     const struct net_device *in,
			     const struct net_device *out,
			     const struct nf_hook_state *state)
{%- else %}

unsigned int nq_{{ f.function }}(const struct nf_hook_ops *ops, struct sk_buff *skb,
			     const struct net_device *in,
			     const struct net_device *out,
			     int (*okfn)(struct sk_buff *))
{%- endif %}
{
	enum ip_conntrack_info ctinfo;
	struct nf_conn *ct;
{%- if f.family == "ipv6" %}
	unsigned char pnum = ipv6_hdr(skb)->nexthdr;
	__be16 frag_off;
	int protoff;
{%- endif %}

	ct = nf_ct_get(skb, &ctinfo);
	if (!ct || ctinfo == IP_CT_RELATED_REPLY)
		return nq_confirm_fixed(skb);
{%- if f.family == "ipv6" %}

	protoff = ipv6_skip_exthdr(skb, sizeof(struct ipv6hdr), &pnum,
				   &frag_off);
	if (protoff < 0 || (frag_off & htons(~0x7)) != 0)
		return nq_confirm_fixed(skb);

	/* adjust seqs for loopback traffic only in outgoing direction */
	if (!nq_seq_adjust(skb, ct, ctinfo, protoff))
		return NF_DROP;
{%- else %}

	/* adjust seqs for loopback traffic only in outgoing direction */
	if (!nq_seq_adjust(skb, ct, ctinfo, ip_hdrlen(skb)))
		return NF_DROP;
{%- endif %}
	return nq_confirm_fixed(skb);
}
{%- endfor %}
{%- endif %}
{%- set skip_helpers = cookiecutter.target.generation != "G1" or cookiecutter.strategy == "advance-confirm-corrected" %}

bool nq_preconfirm(struct sk_buff *skb, unsigned int hooknum,
		   const struct net_device *out, unsigned int *verdict)
{
{%- if skip_helpers %}
	enum ip_conntrack_info ctinfo;
	const struct nf_conn_help *help;
	struct nf_conn *ct;

	ct = nf_ct_get(skb, &ctinfo);
	if (!ct)
		return false;
	if (nq_in_vrf_postrouting(hooknum, out))
		return false;
{%- if cookiecutter.target.generation == "G1" %}
	/*
	 * Called at NF_IP_PRI_FIRST, before the helper hook (300): the helper
	 * and the sequence adjustment have not run on this packet yet.
	 */
{%- else %}
	/*
	 * This kernel's confirm runs the helper and the sequence adjustment
	 * before the confirm, once: leave those entries to it.
	 */
{%- endif %}
	help = nfct_help(ct);
	if (help && rcu_access_pointer(help->helper))
		return false;
	if (test_bit(IPS_SEQ_ADJUST_BIT, &ct->status))
		return false;
{%- else %}
	enum ip_conntrack_info ctinfo;

	/*
	 * Generation G1, just before the confirm hook: the helper ran in its
	 * own hook (NF_IP_PRI_CONNTRACK_HELPER) and the kernel's confirm hook
	 * applies the sequence adjustment to confirmed entries too, so
	 * confirming first is the same for every entry.
	 */
	if (!nf_ct_get(skb, &ctinfo))
		return false;
	if (nq_in_vrf_postrouting(hooknum, out))
		return false;
{%- endif %}
	*verdict = nq_confirm_fixed(skb);
	return true;
}
