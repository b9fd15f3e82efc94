"""convert_to_float8 / revert_float8: swap a model's eligible nn.Linear layers for Float8Linear.

Eligible: an exact ``nn.Linear`` (not a subclass) whose in and out features are multiples of 16,
that the filter accepts (when given: torchao's ``module_filter_fn(module, fqn)`` or our older
``module_filter(fqn, module)``), and, by default, that is neither

- the output head: a module whose last name component is one of ``HEAD_NAMES`` (lm_head, output,
  head, classifier, ...), or whose weight is tied to an ``nn.Embedding`` (a tied head), nor
- the first Linear in module order, which in a transformer reads the embeddings directly
  (embedding-adjacent layers see the widest activation ranges; torchao skips them too).

Pass ``skip_first_last=False`` to convert those as well (the filter still applies). The swap
shares the parameters (no copy), so optimizers and state_dicts are unaffected; revert_float8
swaps back to plain nn.Linear, again sharing the parameters.

Mixture-of-experts layers (:class:`tokenforge.nn.MoE`): their router stays an nn.Linear in high
precision (routing decisions are what fp8 noise should not flip; DeepSeek-V3 keeps its gate in
high precision too), and with ``moe_experts=True`` (the default) their two expert GEMMs run in
fp8 through :func:`tokenforge.fp8.grouped_mm_float8` (listed in ``report.experts``; ``emulate``
configs leave them): recipe ``rowwise_with_gw_hp`` for a model converted with that recipe,
``blockwise`` for a blockwise model where the layer's widths are multiples of 128, else ``rowwise``
(see ``expert_recipe_for``; ``report.expert_notes`` names the layers given another than asked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from tokenforge.fp8.config import Float8LinearConfig, resolve_config
from tokenforge.fp8.linear import Float8Linear

HEAD_NAMES = ("lm_head", "output", "head", "classifier", "score", "out_proj_head")


@dataclass
class ConversionReport:
    """What convert_to_float8 did: fully-qualified names converted, and skipped with the reason."""

    recipe: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    experts: list[str] = field(default_factory=list)  # MoE layers whose expert GEMMs now run in fp8
    expert_recipe: Optional[str] = None  # their grouped_mm_float8 recipe
    expert_notes: dict[str, str] = field(default_factory=dict)  # layers given another recipe, and why

    def __str__(self) -> str:
        lines = [f"Float8 conversion ({self.recipe}): {len(self.converted)} converted, {len(self.skipped)} skipped"]
        lines += [f"  converted {name}" for name in self.converted]
        lines += [f"  experts   {name}: grouped GEMMs in fp8 ({self.expert_notes.get(name, self.expert_recipe)})"
                  for name in self.experts]
        lines += [f"  skipped   {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _set_child(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_to_float8(model: nn.Module, recipe="tensorwise",
                      module_filter: Optional[Callable[[str, nn.Module], bool]] = None, *,
                      config: Optional[Float8LinearConfig] = None,
                      module_filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                      skip_first_last: bool = True, moe_experts: bool = True,
                      backend: Optional[str] = None) -> ConversionReport:
    """Swap eligible nn.Linear modules of ``model`` in place for Float8Linear; returns the report.
    ``recipe`` (a name in RECIPES) or ``config`` (a Float8LinearConfig, which wins) says how they
    cast; ``module_filter_fn(module, fqn) -> bool`` (torchao's order) or ``module_filter(fqn,
    module) -> bool`` narrows the choice further (for nn.Linear; ``moe_experts`` decides for the
    expert GEMMs of tokenforge.nn.MoE layers)."""
    config = resolve_config(recipe, config, "convert_to_float8")
    if module_filter is not None and module_filter_fn is not None:
        raise ValueError("convert_to_float8: pass module_filter_fn(module, fqn) or module_filter(fqn, module), not both")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_to_float8: model must be an nn.Module, got {type(model).__name__}")
    if module_filter_fn is not None:
        def module_filter(fqn, module):
            return module_filter_fn(module, fqn)
    report = ConversionReport(config.recipe_name())
    routers = _moe_experts(model, report, moe_experts and not config.emulate)
    tied = _embedding_weights(model)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    first = linears[0][0] if linears else None
    for name, module in linears:
        if isinstance(module, Float8Linear):
            report.skipped[name] = "already Float8Linear"
            continue
        if type(module) is not nn.Linear:
            report.skipped[name] = f"{type(module).__name__} is a subclass of nn.Linear, not converted"
            continue
        if name in routers:
            report.skipped[name] = "MoE router (routing stays in high precision)"
            continue
        if module.in_features % 16 or module.out_features % 16:
            report.skipped[name] = (f"features ({module.in_features}, {module.out_features}) not multiples of 16")
            continue
        if skip_first_last and name.rpartition(".")[2] in HEAD_NAMES:
            report.skipped[name] = "output head (name); pass skip_first_last=False to convert it"
            continue
        if skip_first_last and id(module.weight) in tied:
            report.skipped[name] = "weight tied to an nn.Embedding (output head)"
            continue
        if skip_first_last and name == first:
            report.skipped[name] = "first Linear (embedding-adjacent); pass skip_first_last=False to convert it"
            continue
        if module_filter is not None and not module_filter(name, module):
            report.skipped[name] = "rejected by module_filter"
            continue
        _set_child(model, name, Float8Linear.from_linear(module, backend=backend, config=config))
        report.converted.append(name)
    return report


def _moe_experts(model: nn.Module, report: ConversionReport, convert: bool) -> set[str]:
    """Turn on fp8 expert GEMMs in the eligible tokenforge.nn.MoE layers (``convert``), noting each
    in the report; returns the names of every MoE layer's router."""
    from tokenforge.fp8.grouped import expert_recipe_for, fit_expert_recipe
    from tokenforge.nn.moe import MoE

    report.expert_recipe = expert_recipe_for(report.recipe)
    routers = set()
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        routers.add(f"{name}.router" if name else "router")
        if not convert or module.fp8 is not None:
            continue
        if module.dim % 16 or module.hidden_dim % 16:
            report.skipped[name] = f"MoE experts: dim {module.dim} / hidden_dim {module.hidden_dim} not multiples of 16"
            continue
        module.fp8 = fit_expert_recipe(report.expert_recipe, module.dim, module.hidden_dim)
        report.experts.append(name)
        if module.fp8 != report.expert_recipe:
            report.expert_notes[name] = (f"{module.fp8}: dim {module.dim} / hidden_dim {module.hidden_dim} not "
                                         f"multiples of 128 for {report.expert_recipe}")
    return routers


def revert_float8(model: nn.Module) -> list[str]:
    """Swap every Float8Linear in ``model`` back to nn.Linear (sharing parameters) and turn fp8
    expert GEMMs off; returns their names."""
    from tokenforge.nn.moe import MoE

    for m in model.modules():
        if isinstance(m, MoE):
            m.fp8 = None
    names = [name for name, m in model.named_modules() if isinstance(m, Float8Linear)]
    for name in names:
        module = model.get_submodule(name)
        if name == "":
            raise ValueError("revert_float8: the model itself is a Float8Linear; use model.to_linear()")
        _set_child(model, name, module.to_linear())
    return names
