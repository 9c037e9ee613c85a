/* SPDX-License-Identifier: GPL-2.0 */
/*
 * {{ cookiecutter.module_name }}: per-CPU statistics, read-only in sysfs.
 *
 * The counters of this module are listed once, in nq_counters.h (enum
 * nq_counter and the names; the strategy provides it). Each counter is a
 * per-CPU unsigned long incremented with this_cpu_inc(): no shared
 * cacheline and no atomic on the packet path. Reading
 * /sys/kernel/{{ cookiecutter.module_name }}/<counter> sums the CPUs.
 */
#ifndef NQ_STATS_H
#define NQ_STATS_H

#include <linux/percpu.h>

#include "nq_counters.h"

struct nq_stats {
	unsigned long cnt[NQ_CNT_MAX];
};

DECLARE_PER_CPU(struct nq_stats, nq_stats);

#define nq_count(name) this_cpu_inc(nq_stats.cnt[NQ_CNT_##name])
#define nq_count_add(name, n) this_cpu_add(nq_stats.cnt[NQ_CNT_##name], (n))

int nq_stats_init(void);
void nq_stats_exit(void);

#endif /* NQ_STATS_H */
