"""Reading and writing files safely: the allow-list unpickler and atomic writes.

`safe_pickle` is the only unpickler of the project; `atomic` is the only place
that writes a file or a directory so that it appears complete or not at all.
"""
