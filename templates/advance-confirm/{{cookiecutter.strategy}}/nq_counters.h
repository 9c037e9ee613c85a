/* SPDX-License-Identifier: GPL-2.0 */
/*
 * {{ cookiecutter.module_name }}: the counters in /sys/kernel/{{ cookiecutter.module_name }}/
 * (the same list as "counters" in nqgen-module.json).
 *
{%- if cookiecutter.strategy == "advance-confirm" %}
 * early_confirms: the kernel's confirm called ahead of the queue;
 * clashes: the skb's entry changed across that call (clash resolution ran
 * inside the unfixed confirm: the case the bug crashes on); early_drops:
 * that confirm did not accept; queued: packets sent to NFQUEUE.
 */
{%- else %}
 * confirm_calls: corrected confirm runs; clashes: the skb's entry changed
 * across __nf_conntrack_confirm() (the case the bug crashes on);
 * events_delivered: nf_ct_deliver_cached_events() calls; confirm_drops:
 * __nf_conntrack_confirm() did not accept; early_confirms: UDP packets
 * confirmed ahead of the queue; skipped: UDP packets left to the kernel's
 * confirm (helper, sequence adjustment, VRF, no entry); queued: packets
 * sent to NFQUEUE.
 */
{%- endif %}
{%- from "counters.jinja" import counters with context %}
{%- from "counters.jinja" import counters with context %}
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
