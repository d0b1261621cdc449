"""The loaders' error types: what reading an untrusted file can fail with."""


class ConversionError(ValueError):
  """A teacher file is not usable (wrong format, mismatched or hostile), or its converted
  output cannot be written. The message names the file, the key or the field."""
