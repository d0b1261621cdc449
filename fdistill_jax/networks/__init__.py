"""Networks: EDM's U-Nets and preconditioning (Flax linen, NHWC).

Other modules of this package (discriminator heads, MLPs) append their own
import lines below.
"""

from fdistill_jax.networks.edm import (
    ARCHS, CIFAR10_ARCH, DHARIWAL_TINY_ARCH, IMAGENET64_ARCH, MODEL_TYPES, SONGUNET_TINY_ARCH,
    EDMPrecond, build_edm, check_arch)
from fdistill_jax.networks.layers import (
    Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock)
from fdistill_jax.networks.state_dict import (
    MAX_PARAMS, count_params, declared_param_count, random_variables, variable_shapes,
    variables_from_state_dict)
from fdistill_jax.networks.unets import DhariwalUNet, SongUNet
from fdistill_jax.networks.mlp import ExactTeacher, ToyDenoiser, edm_precond_coefficients
from fdistill_jax.networks.heads import DiscriminatorHeads
