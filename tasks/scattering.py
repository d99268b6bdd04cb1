"""ScatterNet: a fixed 2-D wavelet scattering transform and the small heads trained on it.

Scattering (Mallat 2012, "Group Invariant Scattering"; Bruna & Mallat 2013, "Invariant
Scattering Convolution Networks"): cascades of Morlet wavelet convolutions and moduli, each
order averaged by a Gaussian low-pass phi of width 2^J. With J scales and L orientations an
image channel gives 1 + J L + L^2 J (J - 1) / 2 maps of size H/2^J x W/2^J (81 of 7 x 7 for
J = 2, L = 8 on 28 x 28). The filter bank follows kymatio's (Andreux et al. 2020, JMLR):
Morlet sigma = 0.8 * 2^j, xi = 3 pi / 4 / 2^j, slant 4 / L, phi sigma = 0.8 * 2^(J-1), a
reflect padding of 2^J per side. kymatio itself is not a dependency: 0.3.0 fails to import
with SciPy >= 1.15 (``scipy.special.sph_harm`` is gone) and its own padding/FFT code is not
known to work under ``torch.func.vmap`` (DP-SGD's per-example gradients). Here every order is
computed at full resolution with FFTs (no intermediate subsampling: kymatio's faster scheme
aliases slightly; these 28 x 28 images make the full one cheap) and subsampled by 2^J at the
end, so shifting an image by 2^J pixels shifts its scattering by one output pixel exactly.

Tramer & Boneh (ICLR 2021, "Differentially Private Learning Needs Better Features (or Much
More Data)"): under DP-SGD a linear model or small CNN on ScatterNet features (J = 2) beats
end-to-end CNNs on MNIST; the features are normalised per example by GroupNorm (27 groups of
the 81 maps), never by statistics of the (private) training data.

DP accounting is unchanged by the transform: it has no trainable parameter, its filters depend
only on (J, L, H, W) and never on data, and GroupNorm here normalises each example by its own
statistics, so the model is still a function of (trainable head, one example) and DP-SGD's
per-example clipping bounds each example's influence as before. Its filters are non-persistent
buffers: never in ``state_dict``, so never sent, masked or aggregated.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from strategies.plugins import PluginError
from strategies.sparse.units import Consumer, UnitGroup

__all__ = ["Scattering2d", "ScatterCNN", "ScatterLinear", "gabor_2d", "morlet_2d"]


def _grid(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Periodic coordinates of an m x n grid, origin at [0, 0]: ([m, n], [m, n]) in float64."""
    x = torch.fft.fftfreq(m, 1.0 / m, dtype=torch.float64)  # 0, 1, ..., -1
    y = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
    gx, gy = torch.meshgrid(x, y, indexing="ij")
    return gx, gy


def gabor_2d(
    m: int, n: int, sigma: float, theta: float, xi: float, slant: float = 1.0
) -> torch.Tensor:
    """Complex Gabor filter [m, n] in space (kymatio's ``gabor_2d``, one period)."""
    x, y = _grid(m, n)
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    curv = rot @ torch.diag(torch.tensor([1.0, slant**2], dtype=torch.float64)) @ rot.T
    curv = curv / (2 * sigma**2)
    quad = curv[0, 0] * x * x + (curv[0, 1] + curv[1, 0]) * x * y + curv[1, 1] * y * y
    g = torch.exp(-quad) * torch.exp(1j * xi * (x * c + y * s))
    return g * (slant / (2 * math.pi * sigma**2))


def morlet_2d(m: int, n: int, sigma: float, theta: float, xi: float, slant: float) -> torch.Tensor:
    """Zero-mean Morlet wavelet [m, n]: a Gabor less its mean-matching Gaussian envelope."""
    wave = gabor_2d(m, n, sigma, theta, xi, slant)
    env = gabor_2d(m, n, sigma, theta, 0.0, slant)
    return wave - (wave.sum() / env.sum()) * env


class Scattering2d(nn.Module):
    """Orders 0-2 of the scattering of [B, C, H, W] images: [B, C * K, ceil(H/2^J), ceil(W/2^J)].

    K = 1 + J L + L^2 J (J - 1) / 2, ordered: order 0, order 1 by (j1, theta1), order 2 by
    (j1, theta1, j2 > j1, theta2), channel-major (all of input channel 0 first).
    """

    psi_hat: torch.Tensor  # [J * L, P, Q] complex: Fourier transforms of the wavelets
    phi_hat: torch.Tensor  # [P, Q] complex: of the low-pass

    def __init__(self, shape: tuple[int, int], j: int = 2, orientations: int = 8) -> None:
        super().__init__()
        h, w = shape
        if not 1 <= j <= 4 or not 1 <= orientations <= 16:
            raise PluginError(
                f"scattering: need 1 <= J <= 4, 1 <= L <= 16; got {j}, {orientations}"
            )
        if min(h, w) < 2**j:
            raise PluginError(f"scattering: images must be at least {2**j} x {2**j}, got {h}x{w}")
        self.j, self.orientations, self.shape = j, orientations, (h, w)
        self.pad = 2**j  # reflect padding per side: wavelets at scale < 2^J see no wrap-around
        if self.pad >= min(h, w):
            raise PluginError(f"scattering: images must exceed {self.pad} pixels a side")
        p, q = h + 2 * self.pad, w + 2 * self.pad
        psis = [
            morlet_2d(
                p,
                q,
                0.8 * 2**scale,
                (int(orientations - orientations / 2 - 1) - t) * math.pi / orientations,
                3.0 / 4.0 * math.pi / 2**scale,
                4.0 / orientations,
            )
            for scale in range(j)
            for t in range(orientations)
        ]
        phi = gabor_2d(p, q, 0.8 * 2 ** (j - 1), 0.0, 0.0)
        # float64 filters, cast once: complex64 products as the images are float32
        self.register_buffer(
            "psi_hat", torch.fft.fft2(torch.stack(psis)).to(torch.complex64), persistent=False
        )
        self.register_buffer("phi_hat", torch.fft.fft2(phi).to(torch.complex64), persistent=False)

    @property
    def channels_per_input(self) -> int:
        """K: output maps per input channel."""
        j, o = self.j, self.orientations
        return 1 + j * o + o * o * j * (j - 1) // 2

    def output_size(self) -> tuple[int, int]:
        """(ceil(H / 2^J), ceil(W / 2^J))."""
        s = 2**self.j
        return -(-self.shape[0] // s), -(-self.shape[1] // s)

    def _low(self, u_hat: torch.Tensor) -> torch.Tensor:
        """Average by phi, crop the padding, subsample by 2^J: [..., P, Q] -> [..., H', W']."""
        s = torch.fft.ifft2(u_hat * self.phi_hat).real
        h, w = self.shape
        return s[..., self.pad : self.pad + h : 2**self.j, self.pad : self.pad + w : 2**self.j]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if (h, w) != self.shape:
            raise PluginError(f"scattering: built for {self.shape} images, got {(h, w)}")
        o = self.orientations
        xp = F.pad(x, (self.pad,) * 4, mode="reflect")  # [B, C, P, Q]
        x_hat = torch.fft.fft2(xp)  # [B, C, P, Q]
        s0 = self._low(x_hat).unsqueeze(2)  # [B, C, 1, H', W']
        u1 = torch.fft.ifft2(x_hat.unsqueeze(2) * self.psi_hat).abs()  # [B, C, J*L, P, Q]
        u1_hat = torch.fft.fft2(u1)  # [B, C, J*L, P, Q]
        s1 = self._low(u1_hat)  # [B, C, J*L, H', W']
        s2 = []
        for j1 in range(self.j - 1):
            parents = u1_hat[:, :, j1 * o : (j1 + 1) * o].unsqueeze(3)  # [B, C, L, 1, P, Q]
            children = self.psi_hat[(j1 + 1) * o :]  # [(J-1-j1) L, P, Q]: scales j2 > j1
            u2 = torch.fft.ifft2(parents * children).abs()  # [B, C, L, (J-1-j1) L, P, Q]
            s2.append(self._low(torch.fft.fft2(u2)).flatten(2, 3))  # [B, C, L*(J-1-j1)L, H', W']
        out = torch.cat([s0, s1, *s2], dim=2)  # [B, C, K, H', W']
        return out.flatten(1, 2)  # [B, C*K, H', W']


# Process-wide memo of normalised features: the transform is a fixed function of the image, and
# DP-SGD re-reads every site's ~180 images ~10 times a round and the test set every round, so
# each image is scattered once per process (about 4 ms) instead of every time it is read.
# Keyed by a 128-bit digest of (transform, dtype, shape, bytes); cleared when full, so bounded:
# 12,000 entries of 81 x 7 x 7 float32 = 190 MB.
_MEMO: dict[bytes, torch.Tensor] = {}
_MEMO_MAX = 12_000
_CHUNK = 64  # images scattered at once: [64, 1, 64, 36, 36] complex64 = 42 MB of order-2 maps


class _ScatterBase(nn.Module):
    """Fixed scattering + per-example GroupNorm (no affine: parameter-free, data-independent).

    ``forward(x)`` takes images; ``forward(f, precomputed=True)`` takes ``fixed_features(x)``,
    which DP-SGD computes once per batch outside ``vmap`` (`strategies.privacy.dp_sgd`).
    """

    def __init__(self, input_shape: tuple[int, ...], j: int, groups: int, model: str) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise PluginError(
                f"{model}: expected an image input_shape (C, H, W), got {input_shape}"
            )
        c, h, w = (int(d) for d in input_shape)
        self.scatter = Scattering2d((h, w), j)
        self.maps = c * self.scatter.channels_per_input
        if not 1 <= groups <= self.maps or self.maps % groups:
            raise PluginError(
                f"{model}: groups must divide {self.maps} scattering maps, got {groups}"
            )
        self.norm = nn.GroupNorm(groups, self.maps, affine=False)
        self.out_hw = self.scatter.output_size()
        self._key = f"{c},{h},{w},{j},{self.scatter.orientations},{groups}".encode()

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.scatter(x))  # [B, C*K, H', W']

    @torch.no_grad()
    def fixed_features(self, x: torch.Tensor) -> torch.Tensor:
        """The parameter-free prefix of the model: [B, C, H, W] -> [B, C*K, H', W'] (memoised)."""
        if x.dim() != 4 or x.shape[0] == 0:
            return self._compute(x)
        flat = x.detach().contiguous().cpu().numpy().reshape(x.shape[0], -1)
        keys = [
            hashlib.blake2b(
                self._key + str(x.dtype).encode() + row.tobytes(), digest_size=16
            ).digest()
            for row in flat
        ]
        missing = [i for i, k in enumerate(keys) if k not in _MEMO]
        for start in range(0, len(missing), _CHUNK):
            idx = missing[start : start + _CHUNK]
            feats = self._compute(x[idx])  # [b, C*K, H', W']
            if len(_MEMO) + len(idx) > _MEMO_MAX:
                _MEMO.clear()
            for i, f in zip(idx, feats, strict=True):
                _MEMO[keys[i]] = f.clone()
        return torch.stack([_MEMO[k] for k in keys]).to(x.device)  # [B, C*K, H', W']

    def features(self, x: torch.Tensor, precomputed: bool) -> torch.Tensor:
        if precomputed:
            return x
        if torch._C._functorch.is_functorch_wrapped_tensor(x):  # under vmap/grad: no memo
            return self._compute(x)
        return self.fixed_features(x)


class ScatterLinear(_ScatterBase):
    """Tramer & Boneh's ScatterNet + linear: [B, C, H, W] -> [B, C*K*H'*W'] -> fc -> classes."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, j: int = 2, groups: int = 27
    ) -> None:
        super().__init__(input_shape, j, groups, "scatter-linear")
        self.fc = nn.Linear(self.maps * self.out_hw[0] * self.out_hw[1], num_classes)

    def forward(self, x: torch.Tensor, precomputed: bool = False) -> torch.Tensor:
        return self.fc(self.features(x, precomputed).flatten(1))  # [B, classes]


class ScatterCNN(_ScatterBase):
    """ScatterNet + a small CNN: scatter [B, C*K, H', W'] -> conv3x3 ``width`` -> act -> 2x2 max
    pool -> fc -> classes (Tramer & Boneh's ScatterNet+CNN, one conv block: a 7 x 7 input)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        j: int = 2,
        groups: int = 27,
        width: int = 32,
        activation: str = "tanh",
    ) -> None:
        super().__init__(input_shape, j, groups, "scatter-cnn")
        if not 1 <= width <= 1024:
            raise PluginError(f"scatter-cnn: width must be in [1, 1024], got {width}")
        if activation not in ("relu", "tanh"):
            raise PluginError(f"scatter-cnn: activation must be relu or tanh, got {activation!r}")
        self._act = torch.tanh if activation == "tanh" else F.relu
        h, w = self.out_hw
        self._pool = min(h, w) >= 2
        self._spatial = (h // 2) * (w // 2) if self._pool else h * w
        self.conv = nn.Conv2d(
            self.maps, width, 3, padding=1
        )  # [B, C*K, H', W'] -> [B, width, H', W']
        self.fc = nn.Linear(width * self._spatial, num_classes)

    def forward(self, x: torch.Tensor, precomputed: bool = False) -> torch.Tensor:
        z = self._act(self.conv(self.features(x, precomputed)))  # [B, width, H', W']
        if self._pool:
            z = F.max_pool2d(z, 2)  # [B, width, H'/2, W'/2]
        return self.fc(z.flatten(1))  # [B, classes]

    def unit_groups(self) -> list[UnitGroup]:
        """conv -> fc (flattened [width, H'/2, W'/2]: blocked)."""
        return [
            UnitGroup(
                "conv.weight", ("conv.bias",), (), (Consumer("fc.weight", spatial=self._spatial),)
            )
        ]
