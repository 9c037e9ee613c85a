// SPDX-License-Identifier: GPL-2.0
/*
 * {{ cookiecutter.module_name }}: refuse to load on another build of the
 * modules it attaches to.
 *
 * nqgen read the GNU build ID of each module file it generated this module
 * for. The kernel shows a live module's notes in /sys/module/<module>/notes/
 * (built-in code: /sys/kernel/notes); they are read at load, before anything
 * is registered, and for a module that loads later (an optional target),
 * before this module attaches to it.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/types.h>
#include <linux/err.h>
#include <linux/fs.h>
#include <linux/slab.h>
#include <linux/string.h>

#include "nq_target_id.h"

#define NQ_NOTE_GNU_BUILD_ID 3
#define NQ_NOTES_MAX 4096
{%- set checks = cookiecutter.target.id_checks %}
{%- if checks %}

struct nq_id {
	const char *module;
	const char *path;	/* the live module's build-ID note */
	const u8 *id;		/* what nqgen read from the module file */
	size_t len;
	bool optional;		/* may load after this module */
};
{%- for c in checks %}
{%- set id = c.build_id %}

/* {{ c.module }} */
static const u8 nq_id_{{ loop.index0 }}[] = {
{%- for i in range(0, id | length, 16) %}
	{% for j in range(i, [i + 16, id | length] | min, 2) %}0x{{ id[j:j + 2] }},{{ " " if j + 2 < [i + 16, id | length] | min else "" }}{% endfor %}
{%- endfor %}
};
{%- endfor %}

static const struct nq_id nq_ids[] = {
{%- for c in checks %}
	{
		.module = "{{ c.module }}",
		.path = "{{ c.path }}",
		.id = nq_id_{{ loop.index0 }},
		.len = sizeof(nq_id_{{ loop.index0 }}),
		.optional = {{ "true" if c.optional else "false" }},
	},
{%- endfor %}
};

static ssize_t nq_read_notes(const char *path, u8 *buf, size_t size)
{
	struct file *f;
	loff_t pos = 0;
	ssize_t n;

	f = filp_open(path, O_RDONLY, 0);
	if (IS_ERR(f))
		return PTR_ERR(f);
{%- if cookiecutter.target.id_kernel_read == "offset" %}
	/* this kernel's kernel_read(file, offset, buf, count) */
	n = kernel_read(f, pos, (char *)buf, size);
{%- else %}
	n = kernel_read(f, buf, size, &pos);
{%- endif %}
	filp_close(f, NULL);
	return n;
}

/* The descriptor of the first GNU build-ID note in buf, or NULL. */
static const u8 *nq_find_build_id(const u8 *buf, size_t len, u32 *idlen)
{
	size_t pos = 0;

	while (len - pos >= 12) {
		u32 namesz, descsz, type;
		size_t name, desc;

		memcpy(&namesz, buf + pos, 4);
		memcpy(&descsz, buf + pos + 4, 4);
		memcpy(&type, buf + pos + 8, 4);
		name = pos + 12;
		desc = name + ALIGN((size_t)namesz, 4);
		if (namesz > len || descsz > len || desc > len ||
		    descsz > len - desc)
			return NULL;
		if (type == NQ_NOTE_GNU_BUILD_ID && namesz == 4 &&
		    !memcmp(buf + name, "GNU", 4)) {
			*idlen = descsz;
			return buf + desc;
		}
		pos = desc + ALIGN((size_t)descsz, 4);
		if (pos > len)
			return NULL;
	}
	return NULL;
}

/*
 * Compare the live build of one module with nq_ids[i]; @refusal says what
 * follows a mismatch. -ENOENT when the module is not loaded (no message: an
 * optional target is then checked when it loads).
 */
static int nq_check_one(const struct nq_id *c, const char *refusal)
{
	const u8 *live;
	u32 livelen = 0;
	ssize_t n;
	u8 *buf;
	int ret = -EINVAL;

	buf = kmalloc(NQ_NOTES_MAX, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	n = nq_read_notes(c->path, buf, NQ_NOTES_MAX);
	if (n == -ENOENT) {
		ret = -ENOENT;
		goto out;
	}
	if (n < 0) {
		pr_err("cannot read %s (%zd): cannot tell whether %s is the build this module was generated for; %s\n",
		       c->path, n, c->module, refusal);
		goto out;
	}
	live = nq_find_build_id(buf, n, &livelen);
	if (!live) {
		pr_err("%s has no build ID: cannot tell whether %s is the build this module was generated for; %s\n",
		       c->path, c->module, refusal);
		goto out;
	}
	if (livelen != c->len || memcmp(live, c->id, livelen)) {
		pr_err("wrong target: %s build ID %*phN, generated for %*phN (another build of {{ cookiecutter.target.release }}); %s\n",
		       c->module, (int)min_t(u32, livelen, 64), live,
		       (int)c->len, c->id, refusal);
		goto out;
	}
	ret = 0;
out:
	kfree(buf);
	return ret;
}

int nq_target_id_check(void)
{
	size_t i;
	int ret;

	for (i = 0; i < ARRAY_SIZE(nq_ids); i++) {
		ret = nq_check_one(&nq_ids[i], "refusing to load");
		if (ret == -ENOENT && nq_ids[i].optional)
			continue;	/* checked by nq_target_id_check_late() */
		if (ret == -ENOENT)
			pr_err("%s is not loaded (no %s); refusing to load\n",
			       nq_ids[i].module, nq_ids[i].path);
		if (ret)
			return ret;
	}
	return 0;
}

int nq_target_id_check_late(const char *module)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(nq_ids); i++)
		if (!strcmp(nq_ids[i].module, module))
			return nq_check_one(&nq_ids[i], "not attaching to it");
	return 0;	/* no build ID known for it: nothing to compare */
}
{%- else %}

int nq_target_id_check(void)
{
	/* nqgen found no build ID in the modules it read: nothing to compare */
	pr_info("{{ cookiecutter.target.confirm_module }} had no build ID at generation: build not checked\n");
	return 0;
}

int nq_target_id_check_late(const char *module)
{
	return 0;
}
{%- endif %}
