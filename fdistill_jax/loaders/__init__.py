"""Untrusted files -> numpy state dicts -> Flax variables.

The allow-list unpickler (`safe_pickle`, on its bounded pickle machine `unpickler`),
resource bounds (`limits`), the one state-dict reader (`state_dict`), the helpers
every name map shares (`variables`: layouts, matching, the one random initialiser),
and the diffusers / EDM / LDM conversion rules. Nothing here executes code from a file.
"""
