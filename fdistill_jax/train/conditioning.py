"""What the teacher is conditioned on, as the steps see it.

The f-distill engine is conditional: the generator, the fake score and the
teacher all take a conditioning `c` beside (x, sigma), the discriminator
judges (x, c) pairs, and the teacher's score in the f-distill term may be
classifier-free guided, D_u + w (D_c - D_u) with D_u the unconditional
denoiser (paper App. D). What `c` is belongs to the problem, so every teacher
brings a *conditioning* object (`train.teacher.Teacher.conditioning`) with
this interface, and the steps call only these methods:

  host(batch) -> batch
      Host-side preparation of a source's batch before it becomes a global
      array (for text: captions -> token ids). Runs in the prefetch thread.
  check_source(source, config)
      Refuses a data source that does not fit (shapes, classes), saying why.
  draw(teacher_vars, key, indices, batch) -> c            (traced)
      The conditioning of the generator's samples with global indices
      `indices` (sharded like the batch) of this iteration's `batch`.
  real(teacher_vars, key, batch) -> (x_real, c_real) or None     (traced)
      The GAN's real branch: real samples in the teacher's space and their
      conditioning; None when the source has no real samples.
  uncond(teacher_vars, c) -> c_u                           (traced)
      The unconditional conditioning, shaped like `c` (for classifier-free
      guidance).
  dummy(n) -> c
      A conditioning of n examples with the right shape (initialisation).

`c` is opaque to the steps: an array, None, or any pytree whose leaves have
the batch as leading axis (SDXL's {'context', 'pooled', 'time_ids'},
`problems.t2i.distill`); it is only handed to the networks and back to these methods.

`LabelConditioning` below is the class-label case of the image teachers: one-hot
labels drawn uniformly per sample, exactly as `eval.sampling` draws them,
zeros as the unconditional label. A text teacher's conditioning lives with
its teacher (see `train.registry`).
"""

import dataclasses

import jax.numpy as jnp

from fdistill_jax.pipelines import sampling


@dataclasses.dataclass(frozen=True)
class LabelConditioning:
  """One-hot class labels (or none for an unconditional teacher).

  Attributes:
    num_classes: label_dim of the teacher (0: unconditional).
    sample_shape: per-example shape of the teacher's samples; the source must
      yield images of this shape.
  """
  num_classes: int
  sample_shape: tuple

  def host(self, batch):
    return batch

  def check_source(self, source, config):
    del config
    if tuple(source.image_shape) != tuple(self.sample_shape):
      raise ValueError(f"The data source yields samples of shape {tuple(source.image_shape)} "
                       f"but the teacher expects {tuple(self.sample_shape)}; point the data "
                       "config at a dataset of the teacher's resolution and channels.")
    if source.num_classes != self.num_classes:
      raise ValueError(f"The data source has {source.num_classes} classes but the teacher's "
                       f"label_dim is {self.num_classes}.")

  def draw(self, teacher_vars, key, indices, batch):
    """Uniform labels per sample: label_i from fold_in(key, i) (`eval.sampling`)."""
    del teacher_vars, batch
    return sampling.one_hot(sampling.sample_labels(key, indices, self.num_classes),
                            self.num_classes)

  def real(self, teacher_vars, key, batch):
    del teacher_vars, key
    labels = batch["labels"]
    return batch["images"], (labels if labels.shape[-1] else None)

  def uncond(self, teacher_vars, c):
    del teacher_vars
    return None if c is None else jnp.zeros_like(c)

  def dummy(self, n):
    return jnp.zeros((n, self.num_classes)) if self.num_classes else None
