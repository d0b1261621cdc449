"""Which scaled dot-product attention kernel runs: the one home of that choice.

Every attention of the networks (the SD U-Net, VAE, CLIP towers and DINO ViT
through `models.sd.layers.attention`; the EDM U-Nets' self-attention through
`models.layers.attention`) hands its per-head q, k, v `[B, L, H, d]` here with
the setting `attention` (config field `attention`, docs/config.md):

  xla     the reference: each caller's own einsum + float32 softmax, exactly
          the math the networks have always computed (results unchanged
          bitwise).
  jax     `jax.nn.dot_product_attention` with JAX's default implementation
          (XLA's; float32 logits and softmax, as the reference).
  cudnn   cuDNN's fused flash attention (NVIDIA GPUs; bfloat16/float16 inputs,
          head size a multiple of 8 up to 128, 256 on Hopper and later).
  pallas  the Pallas flash-attention kernel JAX ships for TPUs
          (`jax.experimental.pallas.ops.tpu.flash_attention`; sequence
          lengths multiples of 128).
  auto    the fastest of these that runs on the default backend for each call's
          shapes and dtype; `xla` on CPUs and wherever no kernel applies.

A kernel named explicitly that cannot run on this backend at all fails at
trace time with the fix in the message; one whose shape or dtype limits a
particular call exceeds (the SD VAE's single 512-wide head) runs that call on
the reference and says so in the log, as `auto` does. Each distinct choice is
logged once per process.
"""

from typing import Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

SETTINGS = ("auto", "xla", "jax", "cudnn", "pallas")
_BACKEND_OF = {"cudnn": "gpu", "pallas": "tpu"}
_LOGGED = set()


def check_setting(setting: str) -> str:
  """Returns `setting` when it names an implementation; else a ValueError listing them."""
  if setting not in SETTINGS:
    raise ValueError(f"attention={setting!r} is not an attention implementation; use one of "
                     f"{SETTINGS} ('auto' picks the fastest that runs here; 'xla' is the "
                     "reference math).")
  return setting


def _gpu_head_max() -> int:
  capability = getattr(jax.devices()[0], "compute_capability", "0.0")
  return 256 if float(capability) >= 9.0 else 128


def unsupported(kernel: str, q_shape, kv_len: int, dtype, backend: str) -> Optional[str]:
  """Why `kernel` cannot run a call with these shapes here; None when it can.

  Args:
    kernel: 'cudnn' or 'pallas' (the reference and 'jax' run everywhere).
    q_shape: [B, Lq, H, d] of the queries.
    kv_len: key/value length.
    dtype: the inputs' dtype.
    backend: `jax.default_backend()` ('cpu', 'gpu', 'tpu').
  """
  if kernel not in _BACKEND_OF:
    return None
  if backend != _BACKEND_OF[kernel]:
    return f"{kernel} runs on {_BACKEND_OF[kernel].upper()}s only and this backend is {backend}"
  _, lq, _, d = q_shape
  if kernel == "cudnn":
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return f"cuDNN flash attention takes bfloat16/float16, not {jnp.dtype(dtype).name}"
    head_max = _gpu_head_max()
    if d % 8 or d > head_max:
      return f"cuDNN takes head sizes that are multiples of 8 up to {head_max}, not {d}"
    return None
  if lq % 128 or kv_len % 128:
    return f"the Pallas TPU kernel takes lengths that are multiples of 128, not {lq} and {kv_len}"
  return None


def choose(setting: str, q_shape, kv_len: int, dtype, backend: Optional[str] = None):
  """(implementation, reason) that runs one call: 'xla', 'jax', 'cudnn' or 'pallas'.

  Raises:
    ValueError: an unknown setting, or a kernel named explicitly on a backend
      that cannot run it (fix: attention='auto' or 'xla').
  """
  check_setting(setting)
  backend = backend or jax.default_backend()
  if setting in ("xla", "jax"):
    return setting, "requested"
  if setting != "auto":
    if backend != _BACKEND_OF[setting]:
      raise ValueError(f"attention={setting!r} needs a {_BACKEND_OF[setting].upper()} but JAX's "
                       f"default backend is {backend!r}; set --config.attention=auto (the "
                       "fastest kernel that runs here) or xla (the reference).")
    why = unsupported(setting, q_shape, kv_len, dtype, backend)
    return ("xla", f"{why}; the reference runs this call") if why else (setting, "requested")
  reasons = []
  for kernel in ("cudnn", "pallas"):
    why = unsupported(kernel, q_shape, kv_len, dtype, backend)
    if why is None:
      return kernel, "auto: the fused kernel for this backend"
    reasons.append(why)
  return "xla", "auto: " + "; ".join(reasons)


def traced_calls(clear=False):
  """The distinct attention calls traced in this process so far, as tuples
  (setting, implementation, reason, heads, head size, Lq, Lk, dtype name);
  `clear` forgets them (so the next calls are logged again)."""
  calls = sorted(_LOGGED)
  if clear:
    _LOGGED.clear()
  return calls


def _log_once(setting, impl, reason, q_shape, kv_len, dtype):
  key = (setting, impl, reason, q_shape[2], q_shape[3], q_shape[1], kv_len, jnp.dtype(dtype).name)
  if key not in _LOGGED:
    _LOGGED.add(key)
    logging.info("attention=%s: %s runs heads %d x %d, lengths %d -> %d, %s (%s)", setting, impl,
                 q_shape[2], q_shape[3], q_shape[1], kv_len, jnp.dtype(dtype).name, reason)


def _pallas(q, k, v, causal):
  from jax.experimental.pallas.ops.tpu import flash_attention  # pylint: disable=g-import-not-at-top
  t = lambda x: jnp.swapaxes(x, 1, 2)   # [B, L, H, d] <-> [B, H, L, d]
  out = flash_attention.flash_attention(t(q), t(k), t(v), causal=causal,
                                        sm_scale=float(1 / np.sqrt(q.shape[-1])))
  return t(out)


def fused(q, k, v, implementation: str, causal: bool = False):
  """softmax(q k^T / sqrt(d)) v through a library kernel; q, k, v: [B, L, H, d], one dtype.

  `implementation`: 'jax' (JAX's default), 'jax_xla' (JAX's XLA path named
  explicitly), 'cudnn' or 'pallas'. Returns [B, Lq, H, d] in the dtype of q.
  """
  if implementation == "pallas":
    return _pallas(q, k, v, causal)
  impl = {"jax": None, "jax_xla": "xla", "cudnn": "cudnn"}[implementation]
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)


def attend(q, k, v, setting: str, reference: Callable, causal: bool = False):
  """Runs the implementation `choose` picks; the reference is `reference(q, k, v)`.

  q: [B, Lq, H, d]; k, v: [B, Lk, H, d]. The reference keeps each caller's own
  math (so `xla` is bitwise what it always was); the others cast k and v to the
  dtype of q and return [B, Lq, H, d] in the dtype of v.
  """
  impl, reason = choose(setting, q.shape, k.shape[1], q.dtype)
  _log_once(setting, impl, reason, q.shape, k.shape[1], q.dtype)
  if impl == "xla":
    return reference(q, k, v)
  return fused(q, k.astype(q.dtype), v.astype(q.dtype), impl, causal).astype(v.dtype)
