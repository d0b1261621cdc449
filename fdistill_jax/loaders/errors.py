"""The error every loader raises for an unusable file (one home; `train.teacher` re-exports it)."""


class ConversionError(ValueError):
  """A teacher file is not usable (wrong format, mismatched or hostile), or its converted
  output cannot be written. The message names the file, the key or the field."""
