"""ctrace: a kernel-level eBPF tracer for Linux connection tracking."""

__version__ = "0.1.0"
