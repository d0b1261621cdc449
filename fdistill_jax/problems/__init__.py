"""The problems: each folder ends in one plugin object the composition root merges."""
