"""MLP family: `Linear -> act -> Linear -> ... -> Linear`, one activation kind throughout.

config: {"sizes": [in, hidden..., out], "activation": "relu" | "gelu" | "tanh" | "sigmoid"}.
Module names are nn.Sequential's indices (0, 2, 4, ...), which is what a state_dict of the pruning
example holds; a bare state_dict with other names is mapped by the order of its weights.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ArchError, Family, natural_key, register_family

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
# Activations SparseLinear's kernels apply in their epilogue; the others stay separate modules.
FUSABLE = {nn.ReLU: "relu", nn.GELU: "gelu"}


class MLP(nn.Sequential):
    """nn.Sequential of Linear/activation; x (..., in) -> (..., out)."""


def check_config(config: dict, fn: str = "mlp") -> dict:
    sizes, act = config.get("sizes"), config.get("activation", "relu")
    if not (isinstance(sizes, list) and len(sizes) >= 2 and all(isinstance(s, int) and s > 0 for s in sizes)):
        raise ArchError(f"{fn}: sizes must be a list of at least 2 positive ints, got {sizes!r}")
    if act not in ACTIVATIONS:
        raise ArchError(f"{fn}: unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    return {"sizes": list(sizes), "activation": act}


def build(config: dict) -> MLP:
    config = check_config(config)
    sizes, act = config["sizes"], ACTIVATIONS[config["activation"]]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(act())
        layers.append(nn.Linear(n_in, n_out))
    return MLP(*layers)


def from_checkpoint(ck, option: dict) -> tuple[dict, dict, dict]:
    """Layer sizes from the weights' shapes; activation from `option` (--arch mlp:<act>) or the
    pruning report's arch. Every tensor must belong to a Linear layer of one chain."""
    fn = "convert(--arch mlp)"
    hint = ck.extras.get("arch") or {}
    act = option.get("activation") or hint.get("activation") or "relu"
    keys = sorted(ck.tensors, key=natural_key)
    weights = [k for k in keys if (k == "weight" or k.endswith(".weight")) and ck.tensors[k].dim() == 2]
    if not weights:
        raise ArchError(f"{fn}: the state_dict holds no 2-D '*.weight' tensors, so it is not an MLP "
                        f"(keys: {keys[:6]})")
    sd, masks, used = {}, {}, set()
    sizes = [int(ck.tensors[weights[0]].shape[1])]
    for n, wkey in enumerate(weights):
        w = ck.tensors[wkey]
        if int(w.shape[1]) != sizes[-1]:
            raise ArchError(f"{fn}: weight {wkey!r} has shape {tuple(w.shape)} but the previous layer "
                            f"outputs {sizes[-1]} features: not a chain of Linear layers")
        sizes.append(int(w.shape[0]))
        prefix = wkey[:-len("weight")]
        bkey = prefix + "bias"
        name = str(2 * n)  # nn.Sequential index: activations sit between the linears
        sd[f"{name}.weight"] = w
        used.add(wkey)
        if wkey in ck.masks:
            masks[f"{name}.weight"] = ck.masks[wkey]
        if bkey not in ck.tensors:
            raise ArchError(f"{fn}: layer {wkey!r} has no bias {bkey!r} (the MLP family's layers have biases)")
        if tuple(ck.tensors[bkey].shape) != (w.shape[0],):
            raise ArchError(f"{fn}: bias {bkey!r} has shape {tuple(ck.tensors[bkey].shape)}, "
                            f"expected ({w.shape[0]},)")
        sd[f"{name}.bias"] = ck.tensors[bkey]
        used.add(bkey)
    extra = [k for k in keys if k not in used]
    if extra:
        raise ArchError(f"{fn}: tensors {extra[:5]} do not belong to any Linear layer of an MLP; "
                        "use --arch module:pkg.mod:factory for other models")
    if hint.get("sizes") and list(hint["sizes"]) != sizes:
        raise ArchError(f"{fn}: the pruning report says sizes {hint['sizes']} but the weights give {sizes}")
    return check_config({"sizes": sizes, "activation": act}, fn), sd, masks


class MLPFamily(Family):
    name = "mlp"
    arch_help = " | ".join(f"mlp:{a}" for a in ACTIVATIONS)

    def recognise(self, ck) -> dict | None:
        hint = ck.extras.get("arch") or {}  # the pruning report beside a bare state_dict
        return {"activation": hint.get("activation")} if hint.get("family") == "mlp" else None

    def parse_option(self, option: str, arch: str) -> dict:
        if option and option not in ACTIVATIONS:
            raise ArchError(f"convert: unknown MLP activation {option!r} in --arch {arch!r}; expected one "
                            f"of {sorted(ACTIVATIONS)}")
        return {"activation": option or None}

    def from_checkpoint(self, ck, option: dict) -> tuple[dict, dict, dict]:
        return from_checkpoint(ck, option)

    def build(self, config: dict) -> MLP:
        return build(config)

    def prepare_runtime(self, model: MLP, config: dict) -> None:
        """Fuses each ReLU/GELU into the SparseLinear before it (the activation runs in the kernel)."""
        from ..modules import SparseLinear
        for i in range(len(model) - 1):
            act = FUSABLE.get(type(model[i + 1]))
            if isinstance(model[i], SparseLinear) and act is not None:
                model[i].activation = act
                model[i + 1] = nn.Identity()

    def example_inputs(self, config: dict, batch: int, generator: torch.Generator, seq: int = 16) -> tuple:
        return (torch.randn(batch, config["sizes"][0], generator=generator),)

    def spec(self, config: dict, name: str, model: nn.Module) -> dict:
        return {"family": self.name, "name": name,
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, config["sizes"][0]]}],
                "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, config["sizes"][-1]]}]}


FAMILY = register_family(MLPFamily())
