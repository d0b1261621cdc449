"""Reading and writing files safely: the allow-list unpickler, resource bounds, atomic writes.

`safe_pickle` is the only unpickler of the project (on top of `unpickler`, its
bounded pickle machine); `limits` bounds what any reader of an untrusted file
may allocate (budgets, zip and npz headers, object graphs); `atomic` is the
only place that writes a file or a directory so that it appears complete or
not at all.
"""
