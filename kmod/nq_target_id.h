/* SPDX-License-Identifier: GPL-2.0 */
/*
 * {{ cookiecutter.module_name }}: the build of the target module this module
 * was generated for.
 */
#ifndef NQ_TARGET_ID_H
#define NQ_TARGET_ID_H

/*
 * Compare the GNU build ID of the live target module with the one nqgen read
 * from the module file it generated for. Offsets, struct layouts and the
 * corrected confirm are only right for that build: on any other build (same
 * release, other config or compiler) refuse with one line and -EINVAL.
 * Changes nothing; returns 0 when the build matches.
 */
int nq_target_id_check(void);

#endif /* NQ_TARGET_ID_H */
