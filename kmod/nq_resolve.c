// SPDX-License-Identifier: GPL-2.0
/*
 * {{ cookiecutter.module_name }}: resolve the confirm function(s).
 *
{%- if cookiecutter.target.resolve == "anchor" %}
 * kallsyms_lookup_name() is not exported by this kernel. Each function is
 * found from an exported function of the same module section (its anchor)
 * plus the distance nqgen measured in this kernel's own module file; the
 * result is checked by name with sprint_symbol() before anything uses it.
{%- else %}
 * kallsyms_lookup_name() is exported by this kernel; the "module:symbol"
 * form is used with a writable buffer (some kernels write a NUL into it),
 * and the result is checked by name with sprint_symbol().
{%- endif %}
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/kallsyms.h>
#include <linux/string.h>
#include <linux/module.h>
#include <net/netfilter/nf_conntrack_core.h>

#include "nq_resolve.h"

struct nq_target nq_targets[NQ_NTARGETS] = {
{%- for f in cookiecutter.target.families %}
	{
		.family = "{{ f.family }}",
		.name = "{{ f.function }}",
		.module = "{{ f.module }}",
	},
{%- endfor %}
};

static unsigned long nq_target_addr(const struct nq_target *t, int i)
{
{%- if cookiecutter.target.resolve == "anchor" %}
	switch (i) {
{%- for f in cookiecutter.target.families %}
	case {{ loop.index0 }}:
{%- if f.exported %}
		/* {{ f.function }} is exported */
		return (unsigned long)&{{ f.function }};
{%- elif f.anchor %}
		/* {{ f.function }} = {{ f.anchor }} {{ "-" if f.delta.startswith("-") else "+" }} {{ f.delta.lstrip("-") }} */
		return (unsigned long)&{{ f.anchor }} {{ "-" if f.delta.startswith("-") else "+" }} {{ f.delta.lstrip("-") }}UL;
{%- else %}
		/* no exported anchor beside {{ f.function }} in this kernel */
		return 0;
{%- endif %}
{%- endfor %}
	}
	return 0;
{%- else %}
	char buf[KSYM_NAME_LEN + MODULE_NAME_LEN + 2];

	snprintf(buf, sizeof(buf), "%s:%s", t->module, t->name);
	return kallsyms_lookup_name(buf);
{%- endif %}
}

static bool nq_target_check(const struct nq_target *t, unsigned long addr)
{
	char sym[KSYM_SYMBOL_LEN];
	char want[KSYM_NAME_LEN + 8];
	char mod[MODULE_NAME_LEN + 4];
	size_t len;

	sprint_symbol(sym, addr);
	snprintf(want, sizeof(want), "%s+0x0/", t->name);
	snprintf(mod, sizeof(mod), " [%s]", t->module);
	len = strlen(sym);
	if (strncmp(sym, want, strlen(want)) ||
	    len < strlen(mod) || strcmp(sym + len - strlen(mod), mod)) {
		pr_err("%s: the computed address is \"%s\", not %s in [%s]; refusing to load\n",
		       t->family, sym, t->name, t->module);
		return false;
	}
	pr_info("%s: resolved %s ({{ "kallsyms_lookup_name" if cookiecutter.target.resolve == "kallsyms" else "anchor + offset" }}, checked)\n",
		t->family, sym);
	return true;
}

{%- set in_nf_conntrack = cookiecutter.target.families | map(attribute="module") | reject("equalto", "nf_conntrack") | list | length == 0 %}
{%- if cookiecutter.target.resolve == "kallsyms" and in_nf_conntrack %}

/*
 * A looked-up address does not pin its module; a module dependency does.
 * Every target lives in nf_conntrack, which exports __nf_conntrack_confirm:
 * referring to it here makes nf_conntrack a dependency of this module, so
 * it cannot be unloaded first. (__module_address() + try_module_get() would
 * also do, but some 4.19.y and 5.4.y stable kernels no longer export
 * __module_address.) The check below makes sure the reference and the
 * target are in the same module.
 */
static int nq_pin_owner(int i, unsigned long addr)
{
	unsigned long pin = (unsigned long)&__nf_conntrack_confirm;
	char sym[KSYM_SYMBOL_LEN];
	char mod[MODULE_NAME_LEN + 4];
	size_t len;

	sprint_symbol(sym, pin);
	snprintf(mod, sizeof(mod), " [%s]", nq_targets[i].module);
	len = strlen(sym);
	if (len < strlen(mod) || strcmp(sym + len - strlen(mod), mod)) {
		pr_err("%s: __nf_conntrack_confirm is \"%s\", not in [%s]\n",
		       nq_targets[i].family, sym, nq_targets[i].module);
		return -ENOENT;
	}
	return 0;
}

void nq_release_targets(void)
{
	/* the dependency on nf_conntrack ends with this module */
}
{%- elif cookiecutter.target.resolve == "kallsyms" %}

/*
 * A looked-up address does not pin its module (a symbol reference would):
 * hold a reference on the owner of each target until nq_release_targets().
 */
static struct module *nq_owners[NQ_NTARGETS];

static int nq_pin_owner(int i, unsigned long addr)
{
	struct module *mod;

	preempt_disable();
	mod = __module_address(addr);
	if (mod && !try_module_get(mod))
		mod = NULL;
	preempt_enable();
	if (!mod)
		return -ENOENT;
	nq_owners[i] = mod;
	return 0;
}

void nq_release_targets(void)
{
	int i;

	for (i = 0; i < NQ_NTARGETS; i++) {
		if (nq_owners[i])
			module_put(nq_owners[i]);
		nq_owners[i] = NULL;
	}
}
{%- else %}

void nq_release_targets(void)
{
	/* the anchor symbols pin the modules: nothing to release */
}
{%- endif %}

int nq_resolve_targets(void)
{
	int i;

	for (i = 0; i < NQ_NTARGETS; i++) {
		struct nq_target *t = &nq_targets[i];
		unsigned long addr = nq_target_addr(t, i);

		if (!addr) {
			pr_err("%s: cannot find %s in [%s]; refusing to load\n",
			       t->family, t->name, t->module);
			goto err;
		}
		if (!nq_target_check(t, addr))
			goto err;
{%- if cookiecutter.target.resolve == "kallsyms" %}
		if (nq_pin_owner(i, addr)) {
			pr_err("%s: [%s] is going away\n", t->family, t->module);
			goto err;
		}
{%- endif %}
		t->addr = addr;
	}
	return 0;

err:
	nq_release_targets();
	return -ENOENT;
}
