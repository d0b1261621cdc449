"""Untrusted files -> numpy state dicts -> Flax variables.

The allow-list unpickler (`safe_pickle`, on its bounded pickle machine `unpickler`),
resource bounds (`limits`), state-dict readers, name maps and the diffusers / EDM
conversion rules. Nothing here executes code from a file.
"""
