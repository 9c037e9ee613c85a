"""Exceptions raised by nqgen; the CLI maps each class to a one-line message and an exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2  # click's own code for bad options
EXIT_INPUT = 3  # an input file or directory is missing, unreadable or malformed
EXIT_BUILD = 4  # rendering, compiling or checking a module failed
EXIT_LAB = 5  # the lab ran and a mitigation faulted, lost packets or did not unload
EXIT_NOT_APPLICABLE = 77  # the strategy cannot work on this kernel (DKMS's convention)


class NqgenError(Exception):
    """Base class: every error nqgen reports to the user."""

    exit_code = EXIT_INPUT


class InputError(NqgenError):
    """A source the user named (or the default one) is missing, unreadable or malformed."""

    exit_code = EXIT_INPUT


class ElfFormatError(InputError):
    """A file is not an ELF object nqgen can read (not ELF, truncated, wrong class or byte order)."""


class SymbolError(InputError):
    """A symbol nqgen needs is missing or ambiguous in the target."""


class NotApplicableError(NqgenError):
    """The requested strategy cannot work on the target kernel."""

    exit_code = EXIT_NOT_APPLICABLE


class BuildError(NqgenError):
    """Rendering, compiling or checking a generated module failed."""

    exit_code = EXIT_BUILD


class LabError(NqgenError):
    """The lab could not run, or a run showed a fault, packet loss or a failed unload."""

    exit_code = EXIT_LAB


class UsageError(NqgenError):
    """The command line asks for something that does not exist (an unknown strategy, say)."""

    exit_code = EXIT_USAGE
