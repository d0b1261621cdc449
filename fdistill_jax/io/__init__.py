"""Files in and out, safely: resource bounds for reading and atomic writes.

`limits` bounds what any reader of an untrusted file may allocate (budgets, zip
and npz headers, object graphs, bounded JSON); `atomic` is the only place that
writes a file or a directory so that it appears complete or not at all (and the
output manifests that `--overwrite` trusts). The allow-list unpickler and the
format readers built on these live in `fdistill_jax.loaders`.
"""
