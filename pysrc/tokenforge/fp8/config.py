"""Float8LinearConfig: how each operand of Float8Linear's three GEMMs is cast to fp8.

Shaped like torchao's ``Float8LinearConfig`` so a config written for one reads the same here:

    y  = x  @ W^T     cast_config_input,                  cast_config_weight
    dX = dY @ W       cast_config_grad_output,            cast_config_weight_for_grad_input
    dW = dY^T @ X     cast_config_grad_output_for_grad_weight, cast_config_input_for_grad_weight

The ``*_for_grad_*`` configs default to their tensor's main config. A :class:`CastConfig` says
whether the operand is cast (``scaling_type`` dynamic: scales from the current tensor every step,
or disabled: that GEMM runs in the compute dtype, so both of a GEMM's operands must agree), at
which granularity, and to which fp8 format (default e4m3 for x and W, e5m2 for gradients). Every
operand is scaled along its GEMM's reduction dim:

- ``tensorwise``: one scale per tensor;
- ``axiswise``: one per row (or column) of the operand, i.e. per output element's dot product;
- ``blockwise`` (DeepSeek-V3): weights in 128x128 blocks, activations and gradients in 1x128
  blocks along the reduction dim (x per token and 128 features for y, per feature and 128 tokens
  for dW).

Presets (:meth:`Float8LinearConfig.from_recipe_name`, :data:`RECIPES`): ``tensorwise``,
``rowwise`` (axiswise everywhere, e5m2 gradients), ``rowwise_with_gw_hp`` (rowwise, dW in high
precision: the weight gradient is the most sensitive GEMM) and ``blockwise`` (every cast
blockwise, e4m3 throughout: 1x128 blocks leave e5m2's extra range unneeded, as in DeepSeek-V3).
Unlike torchao's rowwise preset, ours keeps exact (not power-of-two) scales and e5m2 gradients;
set ``round_scales_to_power_of_2`` or the cast dtypes to match it.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Optional

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp", "blockwise")


class ScalingType(str, enum.Enum):
    DYNAMIC = "dynamic"
    DISABLED = "disabled"


class ScalingGranularity(str, enum.Enum):
    TENSORWISE = "tensorwise"
    AXISWISE = "axiswise"
    BLOCKWISE = "blockwise"


@dataclass(frozen=True)
class CastConfig:
    """How one GEMM operand is cast: scaling type, granularity, fp8 dtype (None: the role's default)."""

    scaling_type: ScalingType = ScalingType.DYNAMIC
    scaling_granularity: ScalingGranularity = ScalingGranularity.TENSORWISE
    target_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "scaling_type", ScalingType(self.scaling_type))
            object.__setattr__(self, "scaling_granularity", ScalingGranularity(self.scaling_granularity))
        except ValueError as e:
            raise ValueError(f"CastConfig: {e}; scaling_type is one of {[t.value for t in ScalingType]}, "
                             f"scaling_granularity one of {[g.value for g in ScalingGranularity]}") from None
        if self.target_dtype is not None and self.target_dtype not in (E4M3, E5M2):
            raise ValueError(f"CastConfig: target_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, "
                             f"got {self.target_dtype}")

    @property
    def disabled(self) -> bool:
        return self.scaling_type == ScalingType.DISABLED


# The six casts in the order the autograd Function reads them, with each role's default dtype.
_ROLES = (
    ("cast_config_input", E4M3),
    ("cast_config_weight", E4M3),
    ("cast_config_grad_output", E5M2),
    ("cast_config_input_for_grad_weight", E4M3),
    ("cast_config_weight_for_grad_input", E4M3),
    ("cast_config_grad_output_for_grad_weight", E5M2),
)
_GEMMS = (("output (y = x @ W^T)", "cast_config_input", "cast_config_weight"),
          ("grad_input (dX = dY @ W)", "cast_config_grad_output", "cast_config_weight_for_grad_input"),
          ("grad_weight (dW = dY^T @ X)", "cast_config_grad_output_for_grad_weight",
           "cast_config_input_for_grad_weight"))


@dataclass(frozen=True)
class Float8LinearConfig:
    """Per-GEMM cast configs of Float8Linear (see the module docstring); ``emulate`` runs the
    dequantize-then-matmul reference instead of the kernels (any device, for debugging);
    ``enable_fsdp_float8_all_gather``: FSDP2 gathers the weights in fp8 (tokenforge.fp8.fsdp;
    needs the tensorwise weight cast, the same for y and dX)."""

    cast_config_input: CastConfig = CastConfig()
    cast_config_input_for_grad_weight: Optional[CastConfig] = None
    cast_config_weight: CastConfig = CastConfig()
    cast_config_weight_for_grad_input: Optional[CastConfig] = None
    cast_config_grad_output: CastConfig = CastConfig()
    cast_config_grad_output_for_grad_weight: Optional[CastConfig] = None
    round_scales_to_power_of_2: bool = False
    emulate: bool = False
    enable_fsdp_float8_all_gather: bool = False

    def __post_init__(self):
        main = {"cast_config_input_for_grad_weight": self.cast_config_input,
                "cast_config_weight_for_grad_input": self.cast_config_weight,
                "cast_config_grad_output_for_grad_weight": self.cast_config_grad_output}
        for name, default in main.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for name, role_dtype in _ROLES:
            cast = getattr(self, name)
            if not isinstance(cast, CastConfig):
                raise TypeError(f"Float8LinearConfig: {name} must be a CastConfig, got {type(cast).__name__}")
            if cast.target_dtype is None:
                object.__setattr__(self, name, dataclasses.replace(cast, target_dtype=role_dtype))
        if self.enable_fsdp_float8_all_gather:
            w, w_gi = self.cast_config_weight, self.cast_config_weight_for_grad_input
            if w.disabled or w.scaling_granularity != ScalingGranularity.TENSORWISE or w != w_gi:
                raise ValueError("Float8LinearConfig: enable_fsdp_float8_all_gather needs cast_config_weight dynamic "
                                 "tensorwise and cast_config_weight_for_grad_input the same (each rank sees only a "
                                 "shard, so only a whole-tensor scale can be agreed before the all-gather)")
        for gemm, a, b in _GEMMS:
            if getattr(self, a).disabled != getattr(self, b).disabled:
                raise ValueError(f"Float8LinearConfig: the {gemm} GEMM has {a} and {b}; disable both (that GEMM "
                                 "in high precision) or neither")

    @classmethod
    def from_recipe_name(cls, recipe: str) -> "Float8LinearConfig":
        """The preset for a recipe name in :data:`RECIPES`."""
        if isinstance(recipe, cls):
            return recipe
        if recipe not in RECIPES:
            raise ValueError(f"Float8LinearConfig: recipe must be one of {RECIPES}, got {recipe!r}")
        if recipe == "tensorwise":
            return cls()
        if recipe == "rowwise":
            axis = CastConfig(scaling_granularity=ScalingGranularity.AXISWISE)
            return cls(cast_config_input=axis, cast_config_weight=axis, cast_config_grad_output=axis)
        if recipe == "rowwise_with_gw_hp":
            axis = CastConfig(scaling_granularity=ScalingGranularity.AXISWISE)
            off = CastConfig(scaling_type=ScalingType.DISABLED)
            return cls(cast_config_input=axis, cast_config_weight=axis, cast_config_grad_output=axis,
                       cast_config_input_for_grad_weight=off, cast_config_grad_output_for_grad_weight=off)
        block = CastConfig(scaling_granularity=ScalingGranularity.BLOCKWISE, target_dtype=E4M3)
        return cls(cast_config_input=block, cast_config_weight=block, cast_config_grad_output=block)

    def casts(self) -> tuple:
        """The six casts as primitives, in Float8LinearFunction's order (input, weight,
        grad_output, input_for_grad_weight, weight_for_grad_input, grad_output_for_grad_weight):
        each ('disabled' | granularity, fp8 dtype). Plain tuples keep torch.compile graphs whole."""
        out = []
        for name, _ in _ROLES:
            cast = getattr(self, name)
            out.append(("disabled" if cast.disabled else cast.scaling_granularity.value, cast.target_dtype))
        return tuple(out)

    def recipe_name(self) -> str:
        """The preset whose casts this config has (how it executes aside: emulate, fp8
        all-gather), else 'custom'."""
        casts = dataclasses.replace(self, emulate=False, enable_fsdp_float8_all_gather=False)
        for name in RECIPES:
            if casts == Float8LinearConfig.from_recipe_name(name):
                return name
        return "custom"


def resolve_config(recipe, config: Optional[Float8LinearConfig], where: str) -> Float8LinearConfig:
    """``config`` when given (it wins over ``recipe``), else the preset named ``recipe`` (which may
    itself be a Float8LinearConfig)."""
    if config is not None:
        if not isinstance(config, Float8LinearConfig):
            raise TypeError(f"{where}: config must be a Float8LinearConfig, got {type(config).__name__}")
        return config
    if isinstance(recipe, Float8LinearConfig):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"{where}: recipe must be one of {RECIPES} (or pass config=Float8LinearConfig(...)), "
                         f"got {recipe!r}")
    return Float8LinearConfig.from_recipe_name(recipe)
