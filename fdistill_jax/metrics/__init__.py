"""Measures: FID, precision / recall, figures, h(r) statistics; text-to-image under `t2i`."""
