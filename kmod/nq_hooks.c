// SPDX-License-Identifier: GPL-2.0
/*
 * {{ cookiecutter.module_name }}: hook registration,
 * {% if cookiecutter.target.registration == "pernet" %}per network namespace{% else %}global{% endif %} on this kernel.
 */
#include <linux/module.h>
#include <linux/netfilter.h>
{%- if cookiecutter.target.registration == "pernet" %}
#include <net/net_namespace.h>
{%- endif %}

#include "nq_compat.h"

static struct nf_hook_ops *nq_ops;
static unsigned int nq_nops;
{%- if cookiecutter.target.registration == "pernet" %}

static int __net_init nq_hooks_net_init(struct net *net)
{
	return nf_register_net_hooks(net, nq_ops, nq_nops);
}

static void __net_exit nq_hooks_net_exit(struct net *net)
{
	nf_unregister_net_hooks(net, nq_ops, nq_nops);
}

static struct pernet_operations nq_hooks_net_ops = {
	.init = nq_hooks_net_init,
	.exit = nq_hooks_net_exit,
};

int nq_hooks_register(struct nf_hook_ops *ops, unsigned int n)
{
	nq_ops = ops;
	nq_nops = n;
	/* runs .init for every existing netns, and later for new ones */
	return register_pernet_subsys(&nq_hooks_net_ops);
}

void nq_hooks_unregister(void)
{
	/* runs .exit for every netns; returns after an RCU grace period */
	unregister_pernet_subsys(&nq_hooks_net_ops);
}
{%- else %}

int nq_hooks_register(struct nf_hook_ops *ops, unsigned int n)
{
	nq_ops = ops;
	nq_nops = n;
	return nf_register_hooks(nq_ops, nq_nops);
}

void nq_hooks_unregister(void)
{
	/* waits for packets in flight (synchronize_net) before returning */
	nf_unregister_hooks(nq_ops, nq_nops);
}
{%- endif %}
