{% from "counters.jinja" import counters, counter_help with context -%}
/* SPDX-License-Identifier: GPL-2.0 */
{%- set common_help = {
	"confirm_calls": "corrected confirm runs",
	"clashes": "the skb's entry changed across __nf_conntrack_confirm()\n *\t(the case the bug crashes on)",
	"events_delivered": "nf_ct_deliver_cached_events() calls",
	"confirm_drops": "__nf_conntrack_confirm() did not accept",
} %}
/*
 * {{ cookiecutter.module_name }}: the counters in /sys/kernel/{{ cookiecutter.module_name }}/
 * (the same list as "counters" in nqgen-module.json).
 *
{%- for c in counters %}
 * {{ c }}: {{ counter_help.get(c) or common_help[c] }}
{%- endfor %}
 */
#ifndef NQ_COUNTERS_H
#define NQ_COUNTERS_H

enum nq_counter {
{%- for c in counters %}
	NQ_CNT_{{ c }},
{%- endfor %}
	NQ_CNT_MAX
};

#ifdef NQ_STATS_DEFINE_NAMES
static const char * const nq_counter_names[NQ_CNT_MAX] = {
{%- for c in counters %}
	"{{ c }}",
{%- endfor %}
};
#endif

#endif /* NQ_COUNTERS_H */
