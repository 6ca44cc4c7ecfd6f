"""Pretrained CNN / ViT backbones as embedders, from a local weights file (no download, ever).

The networks are plain torch modules whose parameter names match torchvision's (and timm's for the
ResNets), so a ``state_dict`` saved by either loads as it is, with
``torch.load(path, weights_only=True)`` (tensors only; no pickled code runs). PyPI's torchvision
cannot be installed beside every torch build, so the product does not depend on it.

- ``resnet18 | resnet34 | resnet50 | resnet101``: the embedding is the global average of the last
  stage (512 or 2048 features); ``fc`` is not used.
- ``vit_b_16``: the class token after the final LayerNorm (768 features); ``heads`` is not used.
  The position embedding is resized (bicubic) when the input is not 224 px.

Chips go in with every band standardised by its mean and standard deviation over the study's
valid pixels (learned in ``fit``), invalid pixels set to 0 (the band mean), and resized to
``input_size_px`` (bilinear, antialiased when shrinking). The first layer is adapted to the band
count: weights for the same band count are used as they are; RGB weights either go to the bands
named by ``rgb_bands`` (zero elsewhere, i.e. exactly the RGB model on those bands), or are
repeated over all bands and scaled by 3 / bands (timm's ``adapt_input_conv``), so the first
layer's response to a flat image keeps its scale.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eocausal.embed import EmbeddingError
from eocausal.embed.devices import (
    HostStaging,
    cuda_batch_chips,
    dtype_name,
    ieee_float32,
    resolve_device,
    resolve_dtype,
)

__all__ = ["ARCHITECTURES", "BackboneEmbedder", "build_backbone", "load_state_dict", "BACKBONE_ALGORITHM_VERSION"]

# Bump when a change alters the features for the same weights and config.
BACKBONE_ALGORITHM_VERSION = "1"

_STAT_PIXELS = 1 << 20
_DEFAULT_INPUT_PX = {"vit_b_16": 224}


# --- ResNet (torchvision layout) ----------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), as torchvision."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], in_channels: int = 3, num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.n_features = 512 * block.expansion

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# --- ViT (torchvision layout) -------------------------------------------------------------------


class _MLPBlock(nn.Sequential):
    """torchvision's MLPBlock: Linear (0), GELU (1), Dropout (2), Linear (3), Dropout (4)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))


class _EncoderBlock(nn.Module):
    def __init__(self, heads: int, dim: int, hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLPBlock(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class _Encoder(nn.Module):
    def __init__(self, seq_length: int, layers: int, heads: int, dim: int, hidden: int):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.zeros(1, seq_length, dim))
        self.dropout = nn.Dropout(0.0)
        # torchvision names the blocks encoder_layer_0, encoder_layer_1, ...
        self.layers = nn.Sequential()
        for i in range(layers):
            self.layers.add_module(f"encoder_layer_{i}", _EncoderBlock(heads, dim, hidden))
        self.ln = nn.LayerNorm(dim, eps=1e-6)


class VisionTransformer(nn.Module):
    def __init__(self, patch: int, layers: int, heads: int, dim: int, hidden: int,
                 image_size: int = 224, in_channels: int = 3, num_classes: int = 1000):
        super().__init__()
        self.patch_size = patch
        self.image_size = image_size
        self.conv_proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = _Encoder((image_size // patch) ** 2 + 1, layers, heads, dim, hidden)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(dim, num_classes))
        self.n_features = dim

    def _positions(self, grid: int) -> torch.Tensor:
        pos = self.encoder.pos_embedding
        trained = int(math.isqrt(pos.shape[1] - 1))
        if grid == trained:
            return pos
        cls, patches = pos[:, :1], pos[:, 1:]
        patches = patches.reshape(1, trained, trained, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if h != w or h % self.patch_size:
            raise EmbeddingError(f"ViT input must be square and a multiple of {self.patch_size} px, got {h}x{w}")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # [N, tokens, dim]
        x = torch.cat([self.class_token.expand(n, -1, -1), x], 1)
        x = x + self._positions(h // self.patch_size).to(x.dtype)
        x = self.encoder.ln(self.encoder.layers(self.encoder.dropout(x)))
        return x[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.features(x))


ARCHITECTURES = {
    "resnet18": lambda c: ResNet(BasicBlock, [2, 2, 2, 2], c),
    "resnet34": lambda c: ResNet(BasicBlock, [3, 4, 6, 3], c),
    "resnet50": lambda c: ResNet(Bottleneck, [3, 4, 6, 3], c),
    "resnet101": lambda c: ResNet(Bottleneck, [3, 4, 23, 3], c),
    "vit_b_16": lambda c: VisionTransformer(16, 12, 12, 768, 3072, in_channels=c),
}
FEATURE_WIDTHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "vit_b_16": 768}
_FIRST_LAYER = {"resnet": "conv1.weight", "vit": "conv_proj.weight"}
_HEAD_PREFIXES = ("fc.", "heads.")


def build_backbone(arch: str, in_channels: int = 3) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise EmbeddingError(f"unknown backbone {arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](in_channels)


def _first_layer_key(arch: str) -> str:
    return _FIRST_LAYER["vit" if arch.startswith("vit") else "resnet"]


# --- weights ------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _guess_architecture(keys: set[str]) -> str | None:
    if "conv_proj.weight" in keys:
        return "vit_b_16" if "encoder.layers.encoder_layer_11.ln_1.weight" in keys else "a ViT"
    blocks = [len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in (1, 2, 3, 4)]
    if not all(blocks):
        return None
    bottleneck = any(k.endswith("conv3.weight") for k in keys)
    for name, (block, layers) in {
        "resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
        "resnet50": ("bottleneck", [3, 4, 6, 3]), "resnet101": ("bottleneck", [3, 4, 23, 3]),
        "resnet152": ("bottleneck", [3, 8, 36, 3]),
    }.items():
        if blocks == layers and (block == "bottleneck") == bottleneck:
            return name
    return f"a ResNet with {blocks} blocks"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local weights file: a state_dict, or a checkpoint holding one under
    'state_dict' / 'model'; 'module.' / 'model.' / 'backbone.' prefixes shared by all keys are
    dropped (DataParallel, Lightning, SSL wrappers)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(
            f"backbone weights file not found: {path} (weights are never downloaded; put the "
            "file there, e.g. a torchvision or timm state_dict saved with torch.save)"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError...
        raise EmbeddingError(
            f"could not read backbone weights {path} as tensors (torch.load weights_only=True): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not loaded or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise EmbeddingError(f"backbone weights {path} hold no state_dict (a dict of name -> tensor)")
    for prefix in ("module.", "model.", "backbone."):
        if all(k.startswith(prefix) for k in loaded):
            loaded = {k[len(prefix):]: v for k, v in loaded.items()}
    # torchvision ViT files saved before its MLPBlock version 2 name the MLP layers linear_1/2.
    return {k.replace(".mlp.linear_1.", ".mlp.0.").replace(".mlp.linear_2.", ".mlp.3."): v for k, v in loaded.items()}


def adapt_first_layer(weight: torch.Tensor, n_bands: int, rgb_bands: list[int] | None) -> torch.Tensor:
    """[out, c, kh, kw] first-layer weights -> [out, n_bands, kh, kw] (see the module docstring)."""
    c = weight.shape[1]
    if rgb_bands is not None:
        if c != 3:
            raise EmbeddingError(f"rgb_bands needs 3-band (RGB) first-layer weights; the file has {c} bands")
        if len(rgb_bands) != 3 or len(set(rgb_bands)) != 3 or not all(0 <= b < n_bands for b in rgb_bands):
            raise EmbeddingError(f"rgb_bands must be 3 distinct band indexes in [0, {n_bands}), got {rgb_bands}")
        adapted = weight.new_zeros(weight.shape[0], n_bands, *weight.shape[2:])
        for source, band in enumerate(rgb_bands):
            adapted[:, band] = weight[:, source]
        return adapted
    if c == n_bands:
        return weight
    repeats = math.ceil(n_bands / c)
    return weight.repeat(1, repeats, 1, 1)[:, :n_bands] * (c / n_bands)


def _check_match(arch: str, model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> dict:
    expected = model.state_dict()
    first = _first_layer_key(arch)
    wanted = {k for k in expected if not k.startswith(_HEAD_PREFIXES)}
    given = {k for k in state if not k.startswith(_HEAD_PREFIXES)}
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs {arch} {tuple(expected[k].shape)}"
        for k in sorted(wanted & given)
        if k != first and state[k].shape != expected[k].shape
    ]
    if first in state and (state[first].dim() != 4 or state[first].shape[0] != expected[first].shape[0]
                           or state[first].shape[2:] != expected[first].shape[2:]):
        mismatched.insert(0, f"{first}: file {tuple(state[first].shape)} vs {arch} {tuple(expected[first].shape)}")
    if missing or unexpected or mismatched:
        def show(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (and {len(items) - 5} more)" if len(items) > 5 else "")
        parts = [f"{label} {len(items)}: {show(items)}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)) if items]
        guess = _guess_architecture(set(state))
        hint = f"; the file looks like {guess}" if guess and guess != arch else ""
        raise EmbeddingError(f"backbone weights {path} do not match {arch}: " + "; ".join(parts) + hint)
    return {k: v for k, v in state.items() if k in wanted}


# --- the embedder -------------------------------------------------------------------------------


def _check_normalization(normalization: dict | None) -> dict | None:
    if normalization is None:
        return None
    mean, std = list(normalization.get("mean") or []), list(normalization.get("std") or [])
    scale = float(normalization.get("scale", 1.0))
    if not mean or len(mean) != len(std):
        raise EmbeddingError("embedding.normalization needs 'mean' and 'std' lists of the same length (one per band)")
    if not all(np.isfinite(v) for v in [*mean, *std, scale]) or min(std) <= 0 or scale <= 0:
        raise EmbeddingError("embedding.normalization: means must be finite, stds and scale positive")
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "scale": scale}


class BackboneEmbedder:
    """A pretrained backbone's pooled features, with the RCFEmbedder's fit/transform API.

    ``fit`` learns the per-band standardisation and loads the weights; ``transform`` returns
    float32 [N, n_features]. ``dtype="bfloat16"`` runs the forward under bf16 autocast (tensor
    cores / AVX512-BF16 / AMX), ``float32`` in full float32 (no TF32 on CUDA).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        weights: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 64,
        input_size_px: int | None = None,
        rgb_bands: list[int] | None = None,
        seed: int = 0,
        normalization: dict | None = None,
    ) -> None:
        if arch not in ARCHITECTURES:
            raise EmbeddingError(f"unknown backbone {arch!r}; known: {sorted(ARCHITECTURES)}")
        if weights is None:
            raise EmbeddingError("a backbone needs a local weights file (embedding.weights)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise EmbeddingError(f"batch_size must be a positive integer, got {batch_size!r}")
        if input_size_px is not None and (not isinstance(input_size_px, int) or input_size_px < 16):
            raise EmbeddingError(f"input_size_px must be an integer >= 16, got {input_size_px!r}")
        self.arch = arch
        self.weights = Path(weights)
        self.device = str(device)
        self.dtype = str(dtype)
        self.batch_size = int(batch_size)
        self.input_size_px = input_size_px if input_size_px is not None else _DEFAULT_INPUT_PX.get(arch)
        self.rgb_bands = list(rgb_bands) if rgb_bands is not None else None
        self.seed = int(seed)
        # The weights' own input statistics: value = (chip * scale - mean) / std per band, instead of
        # the study's band statistics (see the README's table of weight families).
        self.normalization = _check_normalization(normalization)
        resolve_dtype(self.dtype, resolve_device(self.device))

    def config(self) -> dict:
        """Constructor parameters plus the weights' content hash (JSON-able), for cache keys."""
        return {
            "arch": self.arch,
            "weights_sha256": (self.weights_sha256_ if hasattr(self, "weights_sha256_")
                               else file_sha256(self._weights_file())),
            "device": self.device,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "input_size_px": self.input_size_px,
            "rgb_bands": self.rgb_bands,
            "seed": self.seed,
            **({"normalization": self.normalization} if self.normalization is not None else {}),
        }

    def _weights_file(self) -> Path:
        if not self.weights.is_file():
            load_state_dict(self.weights)  # raises the clear "not found" error
        return self.weights

    @property
    def device_(self) -> str:
        return str(resolve_device(self.device))

    @property
    def dtype_(self) -> str:
        return dtype_name(resolve_dtype(self.dtype, resolve_device(self.device)))

    @property
    def n_features(self) -> int:
        return FEATURE_WIDTHS[self.arch]

    def fit(self, chips: np.ndarray, valid: np.ndarray) -> "BackboneEmbedder":
        chips, valid = _check(chips, valid)
        n_bands = chips.shape[1]
        state = load_state_dict(self.weights)
        model = build_backbone(self.arch, n_bands)
        state = _check_match(self.arch, model, state, self.weights)
        first = _first_layer_key(self.arch)
        state[first] = adapt_first_layer(state[first], n_bands, self.rgb_bands)
        model.load_state_dict(state, strict=False)  # the classifier head stays at its init: unused
        model.eval()

        if self.normalization is not None:
            norm = self.normalization
            if len(norm["mean"]) != n_bands:
                raise EmbeddingError(
                    f"embedding.normalization gives {len(norm['mean'])} band means and stds, the chips have "
                    f"{n_bands} bands (imagery.bands): give one per band read, in that order")
            # (x * scale - mean) / std == (x - mean / scale) / (std / scale)
            self.band_mean_ = np.asarray(norm["mean"], dtype=np.float64) / norm["scale"]
            self.band_std_ = np.asarray(norm["std"], dtype=np.float64) / norm["scale"]
            self.n_bands_ = n_bands
            self.model_ = model
            self.weights_sha256_ = file_sha256(self.weights)
            return self
        rng = np.random.default_rng(self.seed)
        ok = valid & np.isfinite(chips).all(axis=1) if np.issubdtype(chips.dtype, np.floating) else valid
        flat = np.flatnonzero(ok)
        if len(flat) == 0:
            raise EmbeddingError("no valid pixel in any chip (all nodata or NaN): nothing to fit")
        if len(flat) > _STAT_PIXELS:
            flat = np.sort(rng.choice(flat, _STAT_PIXELS, replace=False))
        n_idx, i_idx, j_idx = np.unravel_index(flat, ok.shape)
        values = chips[n_idx, :, i_idx, j_idx].astype(np.float64)
        self.band_mean_ = values.mean(axis=0)
        std = values.std(axis=0)
        self.band_std_ = np.where(std > 0, std, 1.0)
        self.n_bands_ = n_bands
        self.model_ = model
        self.weights_sha256_ = file_sha256(self.weights)
        return self

    def transform(self, chips: np.ndarray, valid: np.ndarray) -> np.ndarray:
        chips, valid = _check(chips, valid)
        return np.concatenate(list(self.transform_stream([(chips, valid)])))

    def fit_transform(self, chips: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return self.fit(chips, valid).transform(chips, valid)

    def transform_stream(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
        if not hasattr(self, "model_"):
            raise EmbeddingError("this BackboneEmbedder is not fitted yet: call fit first")
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        model = self.model_.to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        mean = torch.as_tensor(self.band_mean_, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.band_std_, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        stage_chips, stage_masks = HostStaging(device), HostStaging(device)
        step = None
        for chips, valid in batches:
            chips, valid = _check(chips, valid)
            if chips.shape[1] != self.n_bands_:
                raise EmbeddingError(
                    f"chips have {chips.shape[1]} bands but the embedder was fitted on {self.n_bands_}"
                )
            if step is None:
                step = self.batch_size
                if device.type == "cuda":
                    size = self.input_size_px or max(chips.shape[2:])
                    # Activations of a ResNet-50 forward peak near 100 floats per input pixel.
                    step = cuda_batch_chips(device, 4 * 100 * size * size * max(3, chips.shape[1]), self.batch_size)
            out = np.empty((len(chips), model.n_features), dtype=np.float32)
            for start in range(0, len(chips), step):
                stop = min(start + step, len(chips))
                out[start:stop] = self._forward(
                    model, stage_chips(np.ascontiguousarray(chips[start:stop], dtype=np.float32)),
                    stage_masks(np.ascontiguousarray(valid[start:stop])), mean, std, device, dtype,
                )
            yield out

    def _forward(self, model, x, ok, mean, std, device, dtype) -> np.ndarray:
        with torch.inference_mode():
            ok = ok.to(device) & torch.isfinite(x).all(1)
            x = torch.where(ok.unsqueeze(1), (x - mean) / std, 0.0)
            size = self.input_size_px
            if size is not None and tuple(x.shape[2:]) != (size, size):
                shrink = size < min(x.shape[2:])
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            if dtype == torch.bfloat16:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    features = model.features(x)
            else:
                with ieee_float32(device):
                    features = model.features(x)
            return features.float().cpu().numpy()


def _check(chips: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    chips = np.asarray(chips)
    if chips.ndim != 4 or chips.shape[0] == 0:
        raise EmbeddingError(f"chips must be a non-empty [N, C, H, W] array, got shape {chips.shape}")
    valid = np.asarray(valid)
    if valid.shape != (chips.shape[0],) + chips.shape[2:]:
        raise EmbeddingError(f"valid must be a [N, H, W] mask matching chips {chips.shape}, got {valid.shape}")
    return chips, np.ascontiguousarray(valid, dtype=bool)


def flops_per_image(model: nn.Module, in_channels: int, size: int) -> int:
    """Multiply-adds x 2 of convolutions and linear layers (and attention matmuls) for one input,
    counted with forward hooks on a copy of the model on the meta device (shapes only, no compute)."""
    model = copy.deepcopy(model).to("meta")
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
        total += 2 * output.numel() * kernel

    def linear_hook(module, inputs, output):
        nonlocal total
        total += 2 * output.numel() * module.in_features

    def attention_hook(module, inputs, output):
        nonlocal total
        q = inputs[0]
        n, t, d = q.shape
        total += 2 * 4 * n * t * d * d + 2 * 2 * n * t * t * d  # in/out projections + QK^T, AV

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_hook(attention_hook))
    try:
        with torch.inference_mode():
            model.features(torch.zeros(1, in_channels, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total
