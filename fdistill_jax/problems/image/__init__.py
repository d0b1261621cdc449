"""EDM image runs (CIFAR-10 32x32, ImageNet 64x64): the teacher records built from EDM
networks and the 'edm' student. Reading and converting the teacher files is
`fdistill_jax.loaders.edm`; the data sources (tfds, EDM zip) are generic (`data/`)."""
