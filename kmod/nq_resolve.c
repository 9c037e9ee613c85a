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
{%- set optional = cookiecutter.target.families | selectattr("optional") | list %}
{%- if optional %}
 *
 * {{ optional | map(attribute="function") | join(", ") }} in [{{ optional | map(attribute="module") | unique | join("], [") }}] is optional: that module need
 * not be loaded (IPv4 is protected without it). A module notifier attaches
 * the target when the module has loaded (after checking its build ID, as at
 * load), and pins it like the others.
{%- endif %}
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/kallsyms.h>
#include <linux/string.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <net/netfilter/nf_conntrack_core.h>

#include "nq_resolve.h"
#include "nq_target_id.h"

struct nq_target nq_targets[NQ_NTARGETS] = {
{%- for f in cookiecutter.target.families %}
	{
		.family = "{{ f.family }}",
		.name = "{{ f.function }}",
		.module = "{{ f.module }}",
		.optional = {{ "true" if f.optional else "false" }},
	},
{%- endfor %}
};

/*
 * Serialises resolution (at load and from the module notifier) and the
 * buffers below, which are too large for the stack (KSYM_SYMBOL_LEN is
 * several hundred bytes).
 */
static DEFINE_MUTEX(nq_resolve_lock);
static char nq_sym[KSYM_SYMBOL_LEN];
static char nq_name[KSYM_NAME_LEN + MODULE_NAME_LEN + 8];

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
	snprintf(nq_name, sizeof(nq_name), "%s:%s", t->module, t->name);
	return kallsyms_lookup_name(nq_name);
{%- endif %}
}

static bool nq_target_check(const struct nq_target *t, unsigned long addr)
{
	char mod[MODULE_NAME_LEN + 4];
	size_t len;

	sprint_symbol(nq_sym, addr);
	snprintf(nq_name, sizeof(nq_name), "%s+0x0/", t->name);
	snprintf(mod, sizeof(mod), " [%s]", t->module);
	len = strlen(nq_sym);
	if (strncmp(nq_sym, nq_name, strlen(nq_name)) ||
	    len < strlen(mod) || strcmp(nq_sym + len - strlen(mod), mod)) {
		pr_err("%s: the computed address is \"%s\", not %s in [%s]; refusing to load\n",
		       t->family, nq_sym, t->name, t->module);
		return false;
	}
	pr_info("%s: resolved %s ({{ "kallsyms_lookup_name" if cookiecutter.target.resolve == "kallsyms" else "anchor + offset" }}, checked)\n",
		t->family, nq_sym);
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
	char mod[MODULE_NAME_LEN + 4];
	size_t len;

	sprint_symbol(nq_sym, pin);
	snprintf(mod, sizeof(mod), " [%s]", nq_targets[i].module);
	len = strlen(nq_sym);
	if (len < strlen(mod) || strcmp(nq_sym + len - strlen(mod), mod)) {
		pr_err("%s: __nf_conntrack_confirm is \"%s\", not in [%s]\n",
		       nq_targets[i].family, nq_sym, nq_targets[i].module);
		return -ENOENT;
	}
	return 0;
}

static void nq_unpin_all(void)
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

static void nq_unpin_all(void)
{
	int i;

	for (i = 0; i < NQ_NTARGETS; i++) {
		if (nq_owners[i])
			module_put(nq_owners[i]);
		nq_owners[i] = NULL;
	}
}
{%- else %}

static void nq_unpin_all(void)
{
	/* the anchor symbols pin the modules: nothing to release */
}
{%- endif %}

/* Find, check and pin target @i; its address, or 0. Under nq_resolve_lock. */
static unsigned long nq_find(int i)
{
	struct nq_target *t = &nq_targets[i];
	unsigned long addr = nq_target_addr(t, i);

	if (!addr) {
		if (!t->optional)
			pr_err("%s: cannot find %s in [%s]; refusing to load\n",
			       t->family, t->name, t->module);
		return 0;
	}
	if (!nq_target_check(t, addr))
		return 0;
{%- if cookiecutter.target.resolve == "kallsyms" %}
	if (nq_pin_owner(i, addr)) {
		pr_err("%s: [%s] is going away\n", t->family, t->module);
		return 0;
	}
{%- endif %}
	return addr;
}
{%- if optional %}

static void (*nq_on_attach)(struct nq_target *t);
static bool nq_resolved;	/* nq_resolve_targets() has finished */
static bool nq_started;		/* between nq_resolve_start() and _stop() */
static unsigned long nq_pending[NQ_NTARGETS];	/* attached, unpublished */

/* Make a late target visible; under nq_resolve_lock. */
static void nq_publish(int i, unsigned long addr)
{
	if (nq_on_attach && nq_resolved && !nq_started) {
		nq_pending[i] = addr;
		return;
	}
	nq_pending[i] = 0;
	WRITE_ONCE(nq_targets[i].addr, addr);
	if (nq_started)
		nq_on_attach(&nq_targets[i]);
}

static int nq_module_event(struct notifier_block *nb, unsigned long event,
			   void *data)
{
	struct module *mod = data;
	int i;

	/* LIVE: the module's init has run, and rmmod now waits for our pin */
	if (event != MODULE_STATE_LIVE)
		return NOTIFY_DONE;
	mutex_lock(&nq_resolve_lock);
	for (i = 0; i < NQ_NTARGETS; i++) {
		struct nq_target *t = &nq_targets[i];
		unsigned long addr;

		if (!t->optional || t->addr || nq_pending[i] ||
		    strcmp(mod->name, t->module))
			continue;
		/* the build nqgen generated for, as at load (one line if not) */
		addr = nq_target_id_check_late(t->module) ? 0 : nq_find(i);
		if (!addr) {
			pr_err("%s: [%s] loaded, but %s cannot be used: %s stays unprotected\n",
			       t->family, t->module, t->name, t->family);
			continue;
		}
		pr_info("%s: [%s] loaded: %s attached\n", t->family, t->module,
			t->name);
		nq_publish(i, addr);
	}
	mutex_unlock(&nq_resolve_lock);
	return NOTIFY_DONE;
}

static struct notifier_block nq_module_nb = {
	.notifier_call = nq_module_event,
};

void nq_resolve_on_attach(void (*fn)(struct nq_target *t))
{
	mutex_lock(&nq_resolve_lock);
	nq_on_attach = fn;
	mutex_unlock(&nq_resolve_lock);
}

void nq_resolve_start(void)
{
	int i;

	mutex_lock(&nq_resolve_lock);
	nq_started = !!nq_on_attach;
	for (i = 0; i < NQ_NTARGETS; i++)
		if (nq_pending[i])
			nq_publish(i, nq_pending[i]);
	mutex_unlock(&nq_resolve_lock);
}

void nq_resolve_stop(void)
{
	mutex_lock(&nq_resolve_lock);
	nq_started = false;
	mutex_unlock(&nq_resolve_lock);
}

void nq_release_targets(void)
{
	int i;

	/* waits for a notifier call in progress; none comes after */
	unregister_module_notifier(&nq_module_nb);
	mutex_lock(&nq_resolve_lock);
	nq_unpin_all();
	for (i = 0; i < NQ_NTARGETS; i++) {
		nq_pending[i] = 0;
		WRITE_ONCE(nq_targets[i].addr, 0);
	}
	nq_resolved = false;
	nq_started = false;
	nq_on_attach = NULL;
	mutex_unlock(&nq_resolve_lock);
}

int nq_resolve_targets(void)
{
	int i, ret;

	/* first, so that a module loading meanwhile is not missed */
	ret = register_module_notifier(&nq_module_nb);
	if (ret)
		return ret;
	mutex_lock(&nq_resolve_lock);
	for (i = 0; i < NQ_NTARGETS; i++) {
		struct nq_target *t = &nq_targets[i];
		unsigned long addr;

		if (t->addr)	/* attached by the notifier meanwhile */
			continue;
		addr = nq_find(i);
		if (addr) {
			WRITE_ONCE(t->addr, addr);
		} else if (t->optional && !nq_target_addr(t, i)) {
			pr_info("%s: [%s] is not loaded: %s is attached when it loads\n",
				t->family, t->module, t->name);
		} else {
			mutex_unlock(&nq_resolve_lock);
			nq_release_targets();
			return -ENOENT;
		}
	}
	nq_resolved = true;
	mutex_unlock(&nq_resolve_lock);
	return 0;
}
{%- else %}

/* No optional target on this kernel: nothing is attached late. */
void nq_resolve_on_attach(void (*fn)(struct nq_target *t))
{
}

void nq_resolve_start(void)
{
}

void nq_resolve_stop(void)
{
}

void nq_release_targets(void)
{
	int i;

	mutex_lock(&nq_resolve_lock);
	nq_unpin_all();
	for (i = 0; i < NQ_NTARGETS; i++)
		WRITE_ONCE(nq_targets[i].addr, 0);
	mutex_unlock(&nq_resolve_lock);
}

int nq_resolve_targets(void)
{
	int i;

	mutex_lock(&nq_resolve_lock);
	for (i = 0; i < NQ_NTARGETS; i++) {
		unsigned long addr = nq_find(i);

		if (!addr) {
			mutex_unlock(&nq_resolve_lock);
			nq_release_targets();
			return -ENOENT;
		}
		WRITE_ONCE(nq_targets[i].addr, addr);
	}
	mutex_unlock(&nq_resolve_lock);
	return 0;
}
{%- endif %}
