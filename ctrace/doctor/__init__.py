"""`ctrace doctor`: the usual conntrack-table-full investigation as one command.

inputs (live machine, root tree, bundle) -> snapshot (parsed, table folded into
counters) -> analyze (findings) -> render (text, JSON). collect writes a bundle.
No BPF and no root needed: what could not be read is reported, not fatal.
"""
