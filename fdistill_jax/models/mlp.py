"""Small MLP networks for the 2-D toy demo.

`ToyDenoiser` stands in for an EDM network: it has EDM's preconditioning
(Karras et al. 2022, Table 1, "EDM" column; `c_skip`, `c_out`, `c_in`,
`c_noise`) and the same call signature as the image networks,

  apply(variables, x [B, 2], sigma [B], class_labels=None, *, train=False,
        feature_resolutions=None)

returning the denoised [B, 2], or `(denoised, features)` when
`feature_resolutions` is given. For the MLP, `feature_resolutions` is a tuple
of hidden-layer indices and `features` is a dict `{i: h_i}` of hidden
activations [B, width] (the discriminator heads of f-distill, Sec. 3.3, read
these instead of U-Net encoder maps).

`ExactTeacher` wraps a `fdistill_jax.problems.toy.GaussianMixture`: its output is the
exact posterior mean E[x0 | x_sigma], and its features come from a frozen
`ToyDenoiser` trunk held in its params, so that the engine can treat the toy
teacher exactly like an image teacher, as a `(module, variables)` pair.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill_jax.models.edm import edm_precond_coefficients


def sinusoidal_embedding(t, dim, max_frequency=64.0):
  """Fixed sinusoidal embedding [B, dim] of scalars `t` [B].

  Frequencies are geometric in [1, max_frequency]; with EDM's
  c_noise = log(sigma) / 4 in about [-1.6, 1.1] this resolves sigma finely.
  """
  if dim % 2:
    raise ValueError(f"embedding dim must be even, got {dim}; pick an even emb_dim.")
  freqs = jnp.geomspace(1.0, max_frequency, dim // 2)
  angles = t[:, None].astype(jnp.float32) * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _broadcast_sigma(sigma, batch):
  sigma = jnp.asarray(sigma, jnp.float32)
  return jnp.broadcast_to(sigma.reshape(-1), (batch,)) if sigma.size == 1 else sigma.reshape(batch)


def _check_feature_indices(feature_resolutions, depth):
  bad = [i for i in feature_resolutions if not 0 <= i < depth]
  if bad:
    raise ValueError(f"feature_resolutions {tuple(feature_resolutions)} has hidden-layer "
                     f"indices {bad} outside [0, {depth}); for the MLP pass indices of "
                     f"hidden layers, e.g. {tuple(range(depth))}.")


class ToyDenoiser(nn.Module):
  """EDMPrecond-style MLP denoiser D(x; sigma) for low-dimensional data.

  D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels) (EDM Eq. 7).

  Attributes:
    width: hidden width.
    depth: number of hidden layers (feature indices are 0..depth-1).
    out_dim: data dimension (2 for the toy).
    sigma_data: expected data standard deviation for the preconditioning.
    label_dim: number of classes; 0 for an unconditional model.
    label_dropout: probability of dropping the class label when `train=True`
      (needs a 'dropout' rng), as in EDM's classifier-free training.
    emb_dim: size of the sinusoidal noise embedding.
  """
  width: int = 128
  depth: int = 4
  out_dim: int = 2
  sigma_data: float = 0.5
  label_dim: int = 0
  label_dropout: float = 0.0
  emb_dim: int = 32

  def _embedding(self, c_noise, class_labels, train):
    emb = sinusoidal_embedding(c_noise, self.emb_dim)
    emb = nn.silu(nn.Dense(self.width, name="map_noise0")(emb))
    if self.label_dim:
      if class_labels is None:
        raise ValueError(f"ToyDenoiser has label_dim={self.label_dim} but class_labels is "
                         "None; pass one-hot labels [B, label_dim].")
      labels = class_labels.astype(jnp.float32)
      if train and self.label_dropout:
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.label_dropout,
                                    (labels.shape[0], 1))
        labels = labels * keep
      emb = emb + nn.Dense(self.width, use_bias=False, name="map_label")(labels)
    return nn.silu(nn.Dense(self.width, name="map_noise1")(emb))

  @nn.compact
  def __call__(self, x, sigma, class_labels=None, *, train=False,
               feature_resolutions: Optional[Sequence[int]] = None):
    """Denoises `x` [B, out_dim] at noise levels `sigma` [B] (or a scalar)."""
    sigma = _broadcast_sigma(sigma, x.shape[0])
    c_skip, c_out, c_in, c_noise = edm_precond_coefficients(sigma, self.sigma_data)
    emb = self._embedding(c_noise, class_labels, train)
    h = nn.Dense(self.width, name="in")(c_in[:, None] * x.astype(jnp.float32))
    features = {}
    for i in range(self.depth):
      h = nn.silu(nn.Dense(self.width, name=f"layer{i}")(h)
                  + nn.Dense(self.width, use_bias=False, name=f"layer{i}_emb")(emb))
      features[i] = h
    f_x = nn.Dense(self.out_dim, kernel_init=nn.initializers.zeros, name="out")(h)
    denoised = c_skip[:, None] * x + c_out[:, None] * f_x
    if feature_resolutions is None:
      return denoised
    _check_feature_indices(feature_resolutions, self.depth)
    return denoised, {i: features[i] for i in feature_resolutions}


class ExactTeacher(nn.Module):
  """Exact toy teacher: the posterior mean of a Gaussian mixture, plus features.

  Output: `mixture.denoise(x, sigma, class_labels)`, exact (no parameters);
  class labels, if given, are one-hot over mixture components [B, K].
  Features: hidden activations of a `ToyDenoiser` trunk (params under
  'trunk'), normally a network fitted with `fdistill_jax.problems.toy.fit_denoiser` and
  kept frozen, so discriminator heads see the same kind of features as on an
  image teacher. Build the pair with `fdistill_jax.problems.toy.exact_teacher`.

  Attributes:
    mixture: a `fdistill_jax.problems.toy.GaussianMixture` (hashable, frozen).
    trunk: the `ToyDenoiser` whose params sit under 'trunk'.
  """
  mixture: Any
  trunk: ToyDenoiser = ToyDenoiser()

  @nn.compact
  def __call__(self, x, sigma, class_labels=None, *, train=False,
               feature_resolutions: Optional[Sequence[int]] = None):
    """Exact D(x; sigma) [B, 2], or (D, features) when feature_resolutions is given."""
    del train  # The exact teacher has no dropout.
    sigma = _broadcast_sigma(sigma, x.shape[0])
    denoised = self.mixture.denoise(x, sigma, class_labels)
    if feature_resolutions is None and not self.is_initializing():
      return denoised
    labels = class_labels if self.trunk.label_dim else None
    indices = tuple(range(self.trunk.depth)) if feature_resolutions is None else feature_resolutions
    _, features = self.trunk(x, sigma, labels, train=False, feature_resolutions=indices)
    if feature_resolutions is None:
      return denoised
    return denoised, features
