"""nqgen: generate kernel modules that mitigate the nf_conntrack confirm use-after-free."""

__version__ = "0.1.0"
