/* SPDX-License-Identifier: GPL-2.0 */
/*
 * {{ cookiecutter.module_name }}: the build of the target module this module
 * was generated for.
 */
#ifndef NQ_TARGET_ID_H
#define NQ_TARGET_ID_H

/*
 * Compare the GNU build ID of every live module this module attaches to with
 * the one nqgen read from the module file it generated for. Offsets, struct
 * layouts and the corrected confirm are only right for that build: on any
 * other build (same release, other config or compiler) refuse with one line
 * and -EINVAL. An optional target that is not loaded yet is skipped (see
 * nq_target_id_check_late()). Changes nothing; 0 when every build matches.
 */
int nq_target_id_check(void);

/*
 * The same for one module that loaded after this one (an optional target),
 * before attaching to it: 0 when its build matches or nqgen knew no build ID
 * for it, else one line ("not attaching to it") and an error.
 */
int nq_target_id_check_late(const char *module);

#endif /* NQ_TARGET_ID_H */
