/* SPDX-License-Identifier: GPL-2.0 */
/*
 * {{ cookiecutter.module_name }}: finding the confirm function(s) of this
 * kernel, which are not all exported.
 */
#ifndef NQ_RESOLVE_H
#define NQ_RESOLVE_H

#include <linux/types.h>

{% set fams = cookiecutter.target.families -%}
#define NQ_NTARGETS {{ fams | length }}

struct nq_target {
	const char *family;	/* "ipv4" or "ipv6" */
	const char *name;	/* the kernel function */
	const char *module;	/* the module that holds it */
	bool optional;		/* its module may be absent: attached later */
	/*
	 * Filled by nq_resolve_targets(); 0 while an optional target's module
	 * is not loaded, set (once, READ_ONCE() it) when the module loads.
	 */
	unsigned long addr;
};

extern struct nq_target nq_targets[NQ_NTARGETS];

/*
 * Fill nq_targets[].addr and check each address with sprint_symbol(): it
 * must print exactly "<name>+0x0/" in "[<module>]". Returns 0, or -ENOENT
 * (and says why) when a check fails or a target that is not optional is
 * missing: the module then refuses to load. An optional target whose
 * module is not loaded is attached when that module has loaded (a module
 * notifier): its addr is set then, and its module is pinned like the
 * others.
 */
int nq_resolve_targets(void);

/* Undo nq_resolve_targets() (stops watching, drops module references). */
void nq_release_targets(void);

/*
 * For a strategy that must act when an optional target is attached late
 * (ftrace sets a filter): call nq_resolve_on_attach() before
 * nq_resolve_targets(). A late target then stays unpublished (addr 0) until
 * nq_resolve_start(), which publishes it and calls @fn; afterwards each
 * late target is published and passed to @fn as it comes, in process
 * context, serialised. nq_resolve_stop() ends that: targets attached after
 * it stay unpublished, so nq_targets[].addr no longer changes. Without
 * nq_resolve_on_attach(), late targets are published at once.
 */
void nq_resolve_on_attach(void (*fn)(struct nq_target *t));
void nq_resolve_start(void);
void nq_resolve_stop(void);

#endif /* NQ_RESOLVE_H */
