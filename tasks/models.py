"""Reference models (CNN, transformer, grid GNN, MLP, ScatterNet); shared by client and server."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from strategies.plugins import PluginError, Registry, check_options, option_kwargs
from strategies.sparse.units import Consumer, UnitGroup
from tasks.gnn import GridGNN
from tasks.model_shapes import ModelError, image_shape
from tasks.scattering import ScatterCNN, ScatterLinear

# ------------------------------------------------------------------ CNN

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
}


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks then two linear layers: conv16 -> conv32 -> fc128 -> classes.

    16/32 channels rather than 32/64: on 2 CPU cores the wider net is ~6x slower per step for
    well under a point of MNIST-5k accuracy. ``activation = "tanh"``: the tempered sigmoid
    that Papernot et al. (AAAI 2021, "Tempered Sigmoid Activations for Deep Learning with
    Differential Privacy") recommend for DP-SGD: bounded activations keep gradient norms
    small, so per-example clipping throws away less signal. ``hidden``: fc1's width.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        activation: str = "relu",
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ModelError(
                f"cnn: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        if not 1 <= hidden <= 4096:
            raise ModelError(f"cnn: hidden must be in [1, 4096], got {hidden}")
        self._act = ACTIVATIONS[activation]
        if len(input_shape) != 3:
            raise ModelError(f"cnn: expected an image input_shape (C, H, W), got {input_shape}")
        c, h, w = input_shape
        if h < 4 or w < 4:
            raise ModelError(f"cnn: images must be at least 4x4 (two 2x2 poolings), got {h}x{w}")
        self.conv1 = nn.Conv2d(c, 16, 3, padding=1)  # [B, C, H, W] -> [B, 16, H, W]
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)  # [B, 16, H/2, W/2] -> [B, 32, H/2, W/2]
        flat = 32 * (h // 4) * (w // 4)  # 1568 for 28x28, 128 for 8x8
        self._spatial = (h // 4) * (w // 4)
        self.fc1 = nn.Linear(flat, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self._act(self.conv1(x)), 2)  # [B, 16, H/2, W/2]
        x = F.max_pool2d(self._act(self.conv2(x)), 2)  # [B, 32, H/4, W/4]
        x = self._act(self.fc1(x.flatten(1)))  # [B, hidden]
        return self.fc2(x)  # [B, classes]

    def unit_groups(self) -> list[UnitGroup]:
        """conv1 -> conv2, conv2 -> fc1 (flattened [32, H/4, W/4]: blocked), fc1 -> fc2."""
        return [
            UnitGroup("conv1.weight", ("conv1.bias",), (), (Consumer("conv2.weight"),)),
            UnitGroup(
                "conv2.weight",
                ("conv2.bias",),
                (),
                (Consumer("fc1.weight", spatial=self._spatial),),
            ),
            UnitGroup("fc1.weight", ("fc1.bias",), (), (Consumer("fc2.weight"),)),
        ]


# ------------------------------------------------------------------ transformer


class RowTransformer(nn.Module):
    """Image rows as tokens (each token = one row across channels) through a small encoder.

    Pre-norm layers (norm_first) train stably without warm-up at this size.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        c, h, w = image_shape(input_shape, "transformer")
        # (F,) input: every feature is a token of width 1; (C, H, W): H tokens of width C*W.
        self.num_tokens, self.token_width = (w, 1) if len(input_shape) == 1 else (h, c * w)
        self.embed = nn.Linear(self.token_width, d_model)
        self.pos_embedding = nn.Parameter(torch.zeros(1, self.num_tokens, d_model))
        nn.init.normal_(self.pos_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if x.dim() == 2:  # [B, F] -> [B, F, 1]
            tokens = x.unsqueeze(-1)
        else:  # [B, C, H, W] -> [B, H, C, W] -> [B, H, C*W]
            tokens = x.permute(0, 2, 1, 3).reshape(b, self.num_tokens, self.token_width)
        z = self.embed(tokens) + self.pos_embedding  # [B, T, d]
        z = self.encoder(z)  # [B, T, d]
        return self.head(z.mean(dim=1))  # mean-pool over tokens -> [B, classes]

    def unit_groups(self) -> list[UnitGroup]:
        """Per encoder layer: MLP width (linear1 units -> ReLU -> linear2 columns) and attention
        heads (a head = its d_h rows of each of q, k, v in in_proj -> d_h out_proj columns)."""
        groups = []
        for i, layer in enumerate(self.encoder.layers):
            p = f"encoder.layers.{i}"
            head_dim = int(layer.self_attn.head_dim)
            groups.append(
                UnitGroup(
                    f"{p}.linear1.weight",
                    (f"{p}.linear1.bias",),
                    (),
                    (Consumer(f"{p}.linear2.weight"),),
                )
            )
            groups.append(
                UnitGroup(
                    f"{p}.self_attn.in_proj_weight",
                    (f"{p}.self_attn.in_proj_bias",),
                    (),
                    (Consumer(f"{p}.self_attn.out_proj.weight", spatial=head_dim),),
                    rows_per_unit=head_dim,
                    blocks=3,
                )
            )
        return groups


# ------------------------------------------------------------------ MLP


class MLP(nn.Module):
    """Flatten then two hidden ReLU layers; the default for tabular data."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, int] = (128, 64)
    ) -> None:
        super().__init__()
        n_in = math.prod(input_shape)
        self.fc1 = nn.Linear(n_in, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))  # [B, h0]
        x = F.relu(self.fc2(x))  # [B, h1]
        return self.fc3(x)  # [B, classes]

    def unit_groups(self) -> list[UnitGroup]:
        """fc1 -> fc2 -> fc3."""
        return [
            UnitGroup("fc1.weight", ("fc1.bias",), (), (Consumer("fc2.weight"),)),
            UnitGroup("fc2.weight", ("fc2.bias",), (), (Consumer("fc3.weight"),)),
        ]


# ------------------------------------------------------------------ registry

# A model factory: (input_shape, num_classes, seed, **options) -> nn.Module. Built-ins are
# registered here; users name theirs as "package.module:factory" or via the
# `leanfed.models` entry-point group (see strategies.plugins).
ModelFactory = Callable[..., nn.Module]
MODEL_REGISTRY: Registry[ModelFactory] = Registry("model", "leanfed.models", "model")


@MODEL_REGISTRY.register("cnn")
def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    activation: str = "relu",
    hidden: int = 128,
) -> nn.Module:
    return SmallCNN(input_shape, num_classes, activation, hidden)


@MODEL_REGISTRY.register("transformer")
def transformer(
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    d_model: int = 64,
    nhead: int = 4,
    num_layers: int = 2,
) -> nn.Module:
    return RowTransformer(input_shape, num_classes, d_model, nhead, num_layers, 2 * d_model)


@MODEL_REGISTRY.register("gnn")
def gnn(
    input_shape: tuple[int, ...], num_classes: int, seed: int, hidden: int = 32, num_layers: int = 2
) -> nn.Module:
    return GridGNN(input_shape, num_classes, hidden, num_layers)


@MODEL_REGISTRY.register("mlp")
def mlp(
    input_shape: tuple[int, ...], num_classes: int, seed: int, hidden: int = 128, hidden2: int = 64
) -> nn.Module:
    return MLP(input_shape, num_classes, (hidden, hidden2))


@MODEL_REGISTRY.register("scatter-linear")
def scatter_linear(
    input_shape: tuple[int, ...], num_classes: int, seed: int, j: int = 2, groups: int = 27
) -> nn.Module:
    return ScatterLinear(input_shape, num_classes, j, groups)


@MODEL_REGISTRY.register("scatter-cnn")
def scatter_cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int,
    j: int = 2,
    groups: int = 27,
    width: int = 32,
    activation: str = "tanh",
) -> nn.Module:
    return ScatterCNN(input_shape, num_classes, j, groups, width, activation)


MODELS: tuple[str, ...] = tuple(MODEL_REGISTRY.builtin_names())


def resolve_model_name(name: str, input_shape: tuple[int, ...]) -> str:
    """``auto`` -> ``cnn`` for images of at least 4x4, else ``mlp``; other names unchanged."""
    if name != "auto":
        return name
    shape = tuple(int(d) for d in input_shape)
    return "cnn" if len(shape) == 3 and min(shape[1:]) >= 4 else "mlp"


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int = 0,
    options: Mapping[str, object] | None = None,
) -> nn.Module:
    """A freshly initialised model; the same (name, shape, classes, seed) gives the same weights.

    ``name``: "auto", a built-in, an entry point of ``leanfed.models`` or "module:factory";
    ``options`` (``model.options.*``) go to the factory as keyword arguments.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or any(d < 1 for d in input_shape):
        raise ModelError(f"{name}: input_shape must be non-empty positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ModelError(f"{name}: num_classes must be >= 2, got {num_classes}")
    name = resolve_model_name(name, input_shape)
    try:
        factory = MODEL_REGISTRY.resolve(name)
    except PluginError as exc:
        raise ModelError(str(exc)) from None
    opts = dict(options or {})
    check_options(factory, 3, opts, "model.options")
    # fork_rng: seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(input_shape, num_classes, seed, **option_kwargs(opts))
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model = {name!r}: the factory returned {type(model).__name__}, "
            "expected a torch.nn.Module"
        )
    return model


def default_model_for(dataset: str, input_shape: tuple[int, ...] | None = None) -> str:
    """CNN for image sets, MLP for tabular ones (user files: by input_shape when given)."""
    if dataset in ("mnist5k", "digits"):
        return "cnn"
    if dataset == "breast_cancer" or dataset.startswith("csv:"):
        return "mlp"
    return resolve_model_name("auto", input_shape) if input_shape is not None else "mlp"
