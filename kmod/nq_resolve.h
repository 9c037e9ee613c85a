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
	unsigned long addr;	/* filled by nq_resolve_targets() */
};

extern struct nq_target nq_targets[NQ_NTARGETS];

/*
 * Fill nq_targets[].addr and check each address with sprint_symbol(): it
 * must print exactly "<name>+0x0/" in "[<module>]". Returns 0, or -ENOENT
 * (and says why) when any check fails: the module then refuses to load.
 */
int nq_resolve_targets(void);

/* Undo nq_resolve_targets() (drops module references it took, if any). */
void nq_release_targets(void);

#endif /* NQ_RESOLVE_H */
