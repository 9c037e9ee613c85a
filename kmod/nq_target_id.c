// SPDX-License-Identifier: GPL-2.0
/*
 * {{ cookiecutter.module_name }}: refuse to load on another build of
 * {{ cookiecutter.target.id_module }}.
 *
 * nqgen read the GNU build ID of the {{ cookiecutter.target.id_module }} it
 * generated this module for. The kernel shows the live module's notes in
 * /sys/module/<module>/notes/ (built-in code: /sys/kernel/notes); they are
 * read here once, at load, before anything is registered.
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
{%- set id = cookiecutter.target.id_build_id %}
{%- if id %}

static const char nq_id_path[] = "{{ cookiecutter.target.id_notes_path }}";
static const u8 nq_build_id[] = {
{%- for i in range(0, id | length, 16) %}
	{% for j in range(i, [i + 16, id | length] | min, 2) %}0x{{ id[j:j + 2] }},{{ " " if j + 2 < [i + 16, id | length] | min else "" }}{% endfor %}
{%- endfor %}
};

static ssize_t nq_read_notes(u8 *buf, size_t size)
{
	struct file *f;
	loff_t pos = 0;
	ssize_t n;

	f = filp_open(nq_id_path, O_RDONLY, 0);
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

int nq_target_id_check(void)
{
	const u8 *live;
	u32 livelen = 0;
	ssize_t n;
	u8 *buf;
	int ret = -EINVAL;

	buf = kmalloc(NQ_NOTES_MAX, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	n = nq_read_notes(buf, NQ_NOTES_MAX);
	if (n < 0) {
		pr_err("cannot read %s (%zd): cannot tell whether {{ cookiecutter.target.id_module }} is the build this module was generated for; refusing to load\n",
		       nq_id_path, n);
		goto out;
	}
	live = nq_find_build_id(buf, n, &livelen);
	if (!live) {
		pr_err("%s has no build ID: cannot tell whether {{ cookiecutter.target.id_module }} is the build this module was generated for; refusing to load\n",
		       nq_id_path);
		goto out;
	}
	if (livelen != sizeof(nq_build_id) ||
	    memcmp(live, nq_build_id, livelen)) {
		pr_err("wrong target: {{ cookiecutter.target.id_module }} build ID %*phN, generated for %*phN (another build of {{ cookiecutter.target.release }}); refusing to load\n",
		       (int)min_t(u32, livelen, 64), live,
		       (int)sizeof(nq_build_id), nq_build_id);
		goto out;
	}
	ret = 0;
out:
	kfree(buf);
	return ret;
}
{%- else %}

int nq_target_id_check(void)
{
	/* nqgen found no build ID in the module it read: nothing to compare */
	pr_info("{{ cookiecutter.target.id_module }} had no build ID at generation: build not checked\n");
	return 0;
}
{%- endif %}
