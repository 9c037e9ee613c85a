// SPDX-License-Identifier: GPL-2.0
/*
 * {{ cookiecutter.module_name }}: per-CPU counters exposed read-only as
 * /sys/kernel/{{ cookiecutter.module_name }}/<counter>, one decimal number
 * per file.
 */
#include <linux/kernel.h>
#include <linux/kobject.h>
#include <linux/sysfs.h>
#include <linux/cpumask.h>

#define NQ_STATS_DEFINE_NAMES
#include "nq_stats.h"
#include "nq_target_id.h"

DEFINE_PER_CPU(struct nq_stats, nq_stats);

struct nq_counter_attr {
	struct kobj_attribute kattr;
	enum nq_counter idx;
};

static struct kobject *nq_stats_kobj;

static ssize_t nq_counter_show(struct kobject *kobj,
			       struct kobj_attribute *kattr, char *buf)
{
	const struct nq_counter_attr *ca =
		container_of(kattr, struct nq_counter_attr, kattr);
	unsigned long sum = 0;
	int cpu;

	for_each_possible_cpu(cpu)
		sum += per_cpu(nq_stats, cpu).cnt[ca->idx];
	/* not sysfs_emit(): older kernels of the same generation lack it */
	return scnprintf(buf, PAGE_SIZE, "%lu\n", sum);
}

static struct nq_counter_attr nq_counter_attrs[NQ_CNT_MAX];
static struct attribute *nq_stats_attrs[NQ_CNT_MAX + 1];

static const struct attribute_group nq_stats_group = {
	.attrs = nq_stats_attrs,
};

int nq_stats_init(void)
{
	int i, ret;

	/* every strategy calls this first, before it changes anything */
	ret = nq_target_id_check();
	if (ret)
		return ret;
	for (i = 0; i < NQ_CNT_MAX; i++) {
		struct nq_counter_attr *ca = &nq_counter_attrs[i];

		sysfs_attr_init(&ca->kattr.attr);
		ca->kattr.attr.name = nq_counter_names[i];
		ca->kattr.attr.mode = 0444;
		ca->kattr.show = nq_counter_show;
		ca->idx = i;
		nq_stats_attrs[i] = &ca->kattr.attr;
	}
	nq_stats_kobj = kobject_create_and_add(KBUILD_MODNAME, kernel_kobj);
	if (!nq_stats_kobj)
		return -ENOMEM;
	ret = sysfs_create_group(nq_stats_kobj, &nq_stats_group);
	if (ret) {
		kobject_put(nq_stats_kobj);
		nq_stats_kobj = NULL;
	}
	return ret;
}

void nq_stats_exit(void)
{
	sysfs_remove_group(nq_stats_kobj, &nq_stats_group);
	kobject_put(nq_stats_kobj);
	nq_stats_kobj = NULL;
}
