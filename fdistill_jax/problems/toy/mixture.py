"""2-D Gaussian-mixture toy teacher and the MLP fitted to its exact denoiser.

The toy demo distils an *exact* diffusion teacher: for a mixture
p = sum_k w_k N(mu_k, std^2 I), the noised density p_sigma = p * N(0, sigma^2 I)
is again a mixture (variances std^2 + sigma^2), and the ideal denoiser
D(x; sigma) = E[x0 | x_sigma = x] and the score are closed form (EDM, Karras
et al. 2022, Eq. 3: score = (D - x) / sigma^2). Unequal weights and two rare
modes make mode-seeking divergences (reverse KL, f-distill Table 1) visibly
drop modes, which `fdistill_jax.problems.toy.metrics` measures.

Divergences follow the f-distill convention (Xu et al. 2025, Eq. 1):
D_f(p || q) = E_q[f(p / q)] with r = p_teacher / q_student; f = -log r gives
reverse KL(q || p).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdistill_jax import losses
from fdistill_jax.models import mlp


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
  """Isotropic Gaussian mixture p(x) = sum_k w_k N(x; mu_k, std^2 I).

  Hashable (by value), so it can be a linen attribute or a static jit argument.
  Methods take x [B, D] and sigma as a scalar or [B], and are jittable.

  Attributes:
    means: [K, D] component means.
    weights: [K] positive weights (normalised to sum to 1).
    std: component standard deviation (shared).
  """
  means: np.ndarray
  weights: np.ndarray
  std: float

  def __post_init__(self):
    means = np.array(self.means, np.float32)
    weights = np.array(self.weights, np.float64)
    if means.ndim != 2 or weights.shape != (means.shape[0],):
      raise ValueError(f"expected means [K, D] and weights [K], got {means.shape} and "
                       f"{weights.shape}; pass one weight per mean.")
    if np.any(weights <= 0) or not self.std > 0:
      raise ValueError(f"weights and std must be positive, got weights={weights}, "
                       f"std={self.std}; drop zero-weight components.")
    weights = (weights / weights.sum()).astype(np.float32)
    means.setflags(write=False)
    weights.setflags(write=False)
    object.__setattr__(self, "means", means)
    object.__setattr__(self, "weights", weights)
    object.__setattr__(self, "std", float(self.std))

  def _key(self):
    return (self.means.tobytes(), self.weights.tobytes(), self.means.shape, self.std)

  def __eq__(self, other):
    return isinstance(other, GaussianMixture) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  @property
  def num_components(self):
    return self.means.shape[0]

  def _log_joint(self, x, sigma, class_labels=None):
    """log w_k + log N(x; mu_k, (std^2 + sigma^2) I): [B, K], and the variance [B, 1]."""
    x = jnp.asarray(x, jnp.result_type(float))  # float64 only under jax.enable_x64.
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype).reshape(-1), (x.shape[0],))
    var = (self.std**2 + sigma**2)[:, None]
    sq = jnp.sum((x[:, None, :] - self.means[None]) ** 2, axis=-1)
    log_norm = 0.5 * x.shape[-1] * jnp.log(2 * jnp.pi * var)
    log_joint = jnp.log(self.weights)[None] - sq / (2 * var) - log_norm
    if class_labels is not None:
      labels = jnp.asarray(class_labels, jnp.float32)
      log_joint = log_joint + jnp.where(labels > 0, jnp.log(jnp.maximum(labels, 1e-30)), -jnp.inf)
    return log_joint, var

  def log_density(self, x, sigma):
    """log p_sigma(x) [B], p_sigma = p convolved with N(0, sigma^2 I), exact."""
    log_joint, _ = self._log_joint(x, sigma)
    return jax.nn.logsumexp(log_joint, axis=-1)

  def responsibilities(self, x, sigma, class_labels=None):
    """Posterior P(component k | x_sigma = x) [B, K] (optionally given one-hot labels)."""
    return jax.nn.softmax(self._log_joint(x, sigma, class_labels)[0], axis=-1)

  def denoise(self, x, sigma, class_labels=None):
    """Exact posterior mean E[x0 | x_sigma = x] [B, D].

    Per component, E[x0 | x, k] = mu_k + std^2 / (std^2 + sigma^2) (x - mu_k);
    mixing with the responsibilities gives
    D = (std^2 x + sigma^2 sum_k gamma_k mu_k) / (std^2 + sigma^2).
    Responsibilities use a log-sum-exp softmax: stable for sigma in [1e-3, 1e2].
    `class_labels` [B, K] (one-hot over components) restricts the posterior.
    """
    log_joint, var = self._log_joint(x, sigma, class_labels)
    gamma = jax.nn.softmax(log_joint, axis=-1)
    return (self.std**2 * x + (var - self.std**2) * (gamma @ self.means)) / var

  def score(self, x, sigma):
    """grad_x log p_sigma(x) = sum_k gamma_k (mu_k - x) / (std^2 + sigma^2) [B, D]."""
    log_joint, var = self._log_joint(x, sigma)
    gamma = jax.nn.softmax(log_joint, axis=-1)
    return (gamma @ self.means - x) / var

  def sample(self, rng, n):
    """n samples x [n, D] from p, and their component indices [n] (int32)."""
    rng_k, rng_x = jax.random.split(rng)
    index = jax.random.categorical(rng_k, jnp.log(self.weights), shape=(n,))
    noise = jax.random.normal(rng_x, (n, self.means.shape[1]))
    return jnp.asarray(self.means)[index] + self.std * noise, index.astype(jnp.int32)


def default_mixture():
  """The demo teacher: 8 modes on a unit ring with skewed weights, plus 2 rare modes.

  Ring weights fall from 0.22 to 0.05 around the ring; the rare modes (weight
  0.02 each) sit at the centre and outside the ring between ring modes 0 and 1
  (radius 1.6). std = 0.08 (ring spacing 0.77 is ~10 std, so modes are
  well separated). Per-coordinate data std is about 0.7, close to EDM's
  sigma_data = 0.5.
  """
  angles = 2 * np.pi * np.arange(8) / 8
  ring = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  outer = 1.6 * np.array([[np.cos(np.pi / 8), np.sin(np.pi / 8)]])
  means = np.concatenate([ring, np.zeros((1, 2)), outer])
  weights = [0.22, 0.18, 0.15, 0.12, 0.10, 0.08, 0.06, 0.05, 0.02, 0.02]
  return GaussianMixture(means=means, weights=np.array(weights), std=0.08)


def _noised_batch(mixture, rng, batch, p_mean, p_std):
  rng_x, rng_s, rng_n = jax.random.split(rng, 3)
  x0, _ = mixture.sample(rng_x, batch)
  sigma = losses.sample_sigma_lognormal(rng_s, (batch,), p_mean, p_std)
  return x0 + sigma[:, None] * jax.random.normal(rng_n, x0.shape), sigma


def _weighted_error(model, params, mixture, x, sigma):
  """Per-example EDM-weighted error lambda(sigma) |D_theta - D_exact|^2 (EDM Eq. 8)."""
  sd = model.sigma_data
  weight = losses.edm_loss_weight(sigma, sd)
  diff = model.apply({"params": params}, x, sigma) - mixture.denoise(x, sigma)
  return weight * jnp.sum(diff**2, axis=-1)


def fit_denoiser(mixture, rng, *, steps=2000, batch=512, width=128, depth=4, lr=2e-3,
                 sigma_data=0.5, p_mean=-1.2, p_std=1.2):
  """Fits `ToyDenoiser(width, depth, sigma_data=sigma_data)` to the exact denoiser.

  Regresses on the exact D(x; sigma) (no noisy target, so much lower variance
  than the denoising loss) with EDM's log-normal sigma and weighting (EDM
  Sec. 5, Eq. 8); Adam with cosine decay; the whole loop is one jitted
  `lax.scan`.

  Returns:
    variables {'params': ...} for `mlp.ToyDenoiser(width=width, depth=depth,
    sigma_data=sigma_data)`.
  """
  model = mlp.ToyDenoiser(width=width, depth=depth, sigma_data=sigma_data)
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def loss_fn(params, rng):
    x, sigma = _noised_batch(mixture, rng, batch, p_mean, p_std)
    return jnp.mean(_weighted_error(model, params, mixture, x, sigma))

  def step(carry, rng):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def run(rng):
    rng_init, rng_steps = jax.random.split(rng)
    params = model.init(rng_init, jnp.zeros((1, 2)), jnp.ones((1,)))["params"]
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)),
                                  jax.random.split(rng_steps, steps))
    return params

  return {"params": run(rng)}


def denoiser_error(model, variables, mixture, rng, *, n=8192, p_mean=-1.2, p_std=1.2):
  """Relative EDM-weighted error of a denoiser against the exact one.

  E[lambda |D_theta - D|^2] / E[lambda |c_skip x - D|^2] over EDM's training
  distribution of (x_sigma, sigma): 0 is exact, 1 is no better than the
  skip connection alone (an untrained ToyDenoiser with zero output layer).
  """
  x, sigma = _noised_batch(mixture, rng, n, p_mean, p_std)
  err = _weighted_error(model, variables["params"], mixture, x, sigma)
  sd = model.sigma_data
  c_skip = mlp.edm_precond_coefficients(sigma, sd)[0]
  weight = losses.edm_loss_weight(sigma, sd)
  base = weight * jnp.sum((c_skip[:, None] * x - mixture.denoise(x, sigma)) ** 2, axis=-1)
  return float(jnp.mean(err) / jnp.mean(base))


def exact_teacher(mixture, trunk_variables, trunk=None):
  """(ExactTeacher module, variables): the toy teacher in the image-teacher form.

  Args:
    mixture: the GaussianMixture.
    trunk_variables: variables of a ToyDenoiser (e.g. from `fit_denoiser`);
      its hidden activations become the teacher features.
    trunk: that ToyDenoiser module (default: ToyDenoiser() with the default
      width/depth used by `fit_denoiser`).
  """
  module = mlp.ExactTeacher(mixture=mixture, trunk=trunk or mlp.ToyDenoiser())
  return module, {"params": {"trunk": trunk_variables["params"]}}


# name -> mixture; `config.data.mixture` picks the teacher and the data alike.
MIXTURES = {"ring10": default_mixture}


def get_mixture(name):
  """The mixture `name` names in MIXTURES."""
  if name not in MIXTURES:
    raise ValueError(f"data.mixture={name!r}; expected one of {sorted(MIXTURES)}.")
  return MIXTURES[name]()
