"""The VM lab: boot the target kernel under qemu (TCG) and measure every generated module.

``nqgen lab --out out`` boots a busybox initramfs once for a baseline, once for a baseline with all UDP
sent through NFQUEUE, then once per built strategy (``out/<strategy>/nqgen-module.json``). In each boot
the kernel's own conntrack/NFQUEUE/ctnetlink modules are loaded in ``modules.dep`` order, the lab's helper
module (``guest/nqlab_ct.c``) enables conntrack, a ctnetlink listener and an NFQUEUE consumer run, and
racing UDP senders start many flows. Results come back as JSON lines on a second serial port; kernel
reports are read from the console. Output: ``out/lab.json``, ``out/lab.png``, ``out/LAB.md``, the measured
columns of ``out/COMPARISON.md``, console logs in ``out/lab-logs/``.

Modules: ``kernel`` (image, release, PVH vmlinux), ``modtree`` (modules.dep closure), ``build`` (guest
programs, helper module), ``initramfs`` (cpio), ``guest`` (the /init script), ``qemu`` (one boot),
``results`` (parsing, fault reports), ``manifest``, ``runner`` (all boots), ``report``, ``command``.
"""
