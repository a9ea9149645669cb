"""The demo ledger service: its .proto, generated modules and a reference servicer.

Regenerate the modules with ``python -m protos.regenerate`` from the repository root.
"""
