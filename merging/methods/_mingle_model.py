"""MINGLE's merged model: a CLIP ViT image tower whose linear layers carry gated low-rank experts.

The tower keeps the pretrained weights θ0 everywhere (MINGLE changes no bias, LayerNorm or
embedding). Each adapted linear layer ("site": q, k, v, the attention output, the MLP's fc1 and
fc2 of every block) holds, per merged task e, a low-rank expert Δ_e = B_e A_e and a linear gate
(w_e, b_e) on the layer's input. For an input x of N tokens the gate's coefficient is

    g_e(x) = w_e · mean_n(x_n) + b_e          (the code's gate(x).mean(dim=1); no softmax)

and the layer computes x (W0 + Σ_e g_e Δ_e)ᵀ + b0. With ``routing="batch"`` (the code's
``batch_reduce: true``) the coefficients are first averaged over the batch, so one weight
serves the whole batch; batches are cut into chunks of ``chunk`` images (FusionBench's test
loader uses 128) so that the result does not depend on the caller's batch size. With
``routing="sample"`` every image gets its own coefficients.

open_clip packs q, k and v into ``attn.in_proj_weight`` and runs ``nn.MultiheadAttention``,
which has no per-projection module to hook, so :class:`MingleEncoder` computes the tower
explicitly from the state dict: equal to open_clip's ``VisionTransformer`` forward when there
are no experts (tests check it). Saving writes one safetensors file with the experts, gates,
subspaces and (optionally) θ0, and a JSON config in the metadata; :func:`load` rebuilds the module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merging.errors import CheckpointError, MergingError

SITES = ("q", "k", "v", "out", "fc1", "fc2")
# which input a site reads: q, k and v read the same LayerNorm output
INPUT_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "out": "attn_out", "fc1": "mlp_in", "fc2": "mlp_out"}
# the code's lora_layer: [attn, mlp] (default) or [attn, fc1] (MINGLE* in examples/mingle/tab1.sh)
LAYER_SETS = {"attn_mlp": SITES, "attn_fc1": ("q", "k", "v", "out", "fc1")}
FORMAT = "mingle-v1"


def weight_key(layer: int, site: str) -> tuple[str, str, slice | None]:
    """The canonical weight and bias keys of a site and, for q/k/v, its row slice in the packed weight."""
    prefix = f"transformer.resblocks.{layer}."
    if site in ("q", "k", "v"):
        return prefix + "attn.in_proj_weight", prefix + "attn.in_proj_bias", slice(None)
    name = {"out": "attn.out_proj", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}[site]
    return prefix + name + ".weight", prefix + name + ".bias", None


def site_tensors(state: Mapping[str, Tensor], layer: int, site: str) -> tuple[Tensor, Tensor]:
    """A site's weight and bias in ``state`` (views: q/k/v are row slices of the packed weight)."""
    weight, bias, packed = weight_key(layer, site)
    w, b = state[weight], state[bias]
    if packed is not None:
        d = w.shape[0] // 3
        i = ("q", "k", "v").index(site)
        return w[i * d : (i + 1) * d], b[i * d : (i + 1) * d]
    return w, b


@dataclass(frozen=True)
class TowerConfig:
    """What the explicit forward needs beyond the weights."""

    layers: int
    heads: int
    patch_size: int
    quick_gelu: bool
    eps: float

    @classmethod
    def from_module(cls, encoder: nn.Module, source: str = "the image tower") -> TowerConfig:
        """Read an open_clip VisionTransformer's settings; variants the explicit forward lacks raise."""
        try:
            blocks = encoder.transformer.resblocks
            block = blocks[0]
            unsupported = [
                name
                for name, present in (
                    ("attention pooling", getattr(encoder, "attn_pool", None) is not None),
                    ("pooling other than the class token", getattr(encoder, "pool_type", "tok") != "tok"),
                    ("LayerNorm after pooling", bool(getattr(encoder, "final_ln_after_pool", False))),
                    ("layer scale", not isinstance(block.ls_1, nn.Identity)),
                    ("a key/value LayerNorm", hasattr(block, "ln_1_kv")),
                    ("attention scaling layers", not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity)),
                    ("a convolution bias", getattr(encoder.conv1, "bias", None) is not None),
                )
                if present
            ]
            activation = type(block.mlp.gelu).__name__
            config = cls(
                layers=len(blocks),
                heads=block.attn.num_heads,
                patch_size=encoder.conv1.kernel_size[0],
                quick_gelu=activation == "QuickGELU",
                eps=float(block.ln_1.eps),
            )
        except AttributeError as missing:
            raise MergingError(f"mingle: {source} is not an open_clip CLIP ViT ({missing})") from None
        if activation not in ("QuickGELU", "GELU"):
            unsupported.append(f"the {activation} activation")
        if unsupported:
            raise MergingError(
                f"mingle: {source} has {unsupported[0]}, which MINGLE's explicit forward does not support"
            )
        return config

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class SiteExperts:
    """One site's experts and gates, stacked over the tasks merged so far.

    ``A`` is (E, r, in), ``B`` (E, out, r): Δ_e = B_e A_e. ``gate_weight`` is (E, in) and
    ``gate_bias`` (E,). Only the newest gate row is ever trained; the others are frozen.
    """

    def __init__(self, A: Tensor, B: Tensor, gate_weight: Tensor, gate_bias: Tensor):
        self.A, self.B, self.gate_weight, self.gate_bias = A, B, gate_weight, gate_bias

    @property
    def count(self) -> int:
        return self.A.shape[0]

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.A, self.B, self.gate_weight, self.gate_bias)

    def delta_sum(self) -> Tensor:
        """Σ_e B_e A_e: the code's ``previous_merged_tv`` (every expert at unit weight)."""
        E, out, r = self.B.shape
        return self.B.permute(1, 0, 2).reshape(out, E * r) @ self.A.reshape(E * r, -1)

    def append(self, A: Tensor, B: Tensor, gate_weight: Tensor, gate_bias: Tensor) -> None:
        self.A = torch.cat([self.A, A[None]])
        self.B = torch.cat([self.B, B[None]])
        self.gate_weight = torch.cat([self.gate_weight, gate_weight[None]])
        self.gate_bias = torch.cat([self.gate_bias, gate_bias.reshape(1)])

    @classmethod
    def first(cls, A: Tensor, B: Tensor, gate_weight: Tensor, gate_bias: Tensor) -> SiteExperts:
        return cls(A[None].clone(), B[None].clone(), gate_weight[None].clone(), gate_bias.reshape(1).clone())


# An observer sees, at every adapted site, the site's name, its input and its per-image coefficients.
Observer = Callable[[str, Tensor, Tensor], None]


class MingleEncoder(nn.Module):
    """The merged model: θ0 plus gated experts, mapping normalised images to image features.

    It registers no parameters: ``base`` (θ0, canonical keys) and ``experts`` (site label
    ``"{layer}.{site}"`` → :class:`SiteExperts`) are the merger's own tensors, shared. Its
    output is the tower's ``encode_image`` before L2 normalisation, like open_clip's forward.
    """

    def __init__(
        self,
        base: Mapping[str, Tensor],
        config: TowerConfig,
        experts: Mapping[str, SiteExperts],
        routing: str = "batch",
        chunk: int = 128,
    ):
        super().__init__()
        if routing not in ("batch", "sample"):
            raise ValueError(f"routing must be batch or sample, not {routing!r}")
        self.base = base
        self.config = config
        self.experts = experts
        self.routing = routing
        self.chunk = chunk
        # during gate training: site → (weight row, bias) that replace the newest gate's (with gradients)
        self.trainable: dict[str, tuple[Tensor, Tensor]] | None = None
        self.observer: Observer | None = None

    def forward(self, images: Tensor) -> Tensor:
        if self.routing == "batch" and images.shape[0] > self.chunk:
            return torch.cat([self._forward(part) for part in images.split(self.chunk)])
        return self._forward(images)

    # ------------------------------------------------------------ the explicit tower

    def _layer_norm(self, x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.base[name + ".weight"], self.base[name + ".bias"], self.config.eps)

    def _forward(self, images: Tensor) -> Tensor:
        p, config = self.base, self.config
        x = F.conv2d(images, p["conv1.weight"].to(images.dtype), stride=config.patch_size)
        x = x.flatten(2).transpose(1, 2)  # (B, grid², width)
        token = p["class_embedding"].to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([token, x], dim=1) + p["positional_embedding"].to(x.dtype)
        x = self._layer_norm(x, "ln_pre")
        for layer in range(config.layers):
            prefix = f"transformer.resblocks.{layer}."
            h = self._layer_norm(x, prefix + "ln_1")
            q, k, v = (self._linear(layer, site, h) for site in ("q", "k", "v"))
            x = x + self._linear(layer, "out", self._attention(q, k, v))
            h = self._linear(layer, "fc1", self._layer_norm(x, prefix + "ln_2"))
            h = h * torch.sigmoid(1.702 * h) if config.quick_gelu else F.gelu(h)
            x = x + self._linear(layer, "fc2", h)
        pooled = self._layer_norm(x[:, 0], "ln_post")
        return pooled @ p["proj"] if p.get("proj") is not None else pooled

    def _attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        batch, tokens, width = q.shape
        heads = self.config.heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(batch, tokens, heads, width // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(batch, tokens, width)

    def gates(self, label: str) -> tuple[Tensor, Tensor]:
        """A site's gate weights (E, in) and biases (E,), with the row under training if any."""
        experts = self.experts[label]
        if self.trainable is not None and label in self.trainable:
            weight, bias = self.trainable[label]
            return (
                torch.cat([experts.gate_weight[:-1], weight[None]]),
                torch.cat([experts.gate_bias[:-1], bias.reshape(1)]),
            )
        return experts.gate_weight, experts.gate_bias

    def _linear(self, layer: int, site: str, x: Tensor) -> Tensor:
        weight, bias = site_tensors(self.base, layer, site)
        label = f"{layer}.{site}"
        experts = self.experts.get(label)
        if experts is None:
            return F.linear(x, weight.to(x.dtype), bias.to(x.dtype))
        gate_weight, gate_bias = self.gates(label)
        coefficients = x.mean(dim=1).float() @ gate_weight.T + gate_bias  # (B, E)
        if self.observer is not None:
            self.observer(label, x, coefficients)
        E, out, r = experts.B.shape
        A = experts.A.reshape(E * r, -1)  # (E r, in)
        B = experts.B.permute(1, 0, 2).reshape(out, E * r)  # (out, E r)
        if self.routing == "batch":
            g = coefficients.mean(dim=0)
            merged = weight + (B * g.repeat_interleave(r)) @ A
            return F.linear(x, merged.to(x.dtype), bias.to(x.dtype))
        low = F.linear(x, A.to(x.dtype)) * coefficients.repeat_interleave(r, dim=1)[:, None, :].to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias.to(x.dtype)) + F.linear(low, B.to(x.dtype))

    # ------------------------------------------------------------ views

    def expert_sum(self) -> dict[str, Tensor]:
        """θ0 + Σ_e Δ_e (every expert at unit weight) as a plain encoder state dict: the analysis view."""
        state = {k: v.clone() for k, v in self.base.items()}
        for label, experts in self.experts.items():
            layer, site = label.split(".")
            weight, _ = site_tensors(state, int(layer), site)
            weight += experts.delta_sum()
        return state

    def collapsed(self, coefficients: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """θ0 + Σ_e c_e Δ_e per site with fixed coefficients (site → (E,)): a plain encoder for one routing."""
        state = {k: v.clone() for k, v in self.base.items()}
        for label, experts in self.experts.items():
            layer, site = label.split(".")
            weight, _ = site_tensors(state, int(layer), site)
            E, out, r = experts.B.shape
            c = coefficients[label].to(weight)
            weight += (experts.B.permute(1, 0, 2).reshape(out, E * r) * c.repeat_interleave(r)) @ experts.A.reshape(
                E * r, -1
            )
        return state


# ---------------------------------------------------------------- saving and loading


def save(
    model: MingleEncoder,
    path: str | Path,
    subspaces: Mapping[str, Tensor] | None = None,
    include_base: bool = True,
    metadata: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the merged model as one safetensors file; returns its path.

    Tensors: ``experts.{layer}.{site}.A`` / ``.B``, ``gates.{layer}.{site}.weight`` / ``.bias``,
    ``subspaces.{layer}.{input}`` (the null-space bases, for merging more tasks later) and, with
    ``include_base``, θ0 as ``base.{canonical key}``; without it, the file names the pretrained
    encoder it needs (``extra["pretrained"]``) and :func:`load` must be given θ0. The metadata key
    ``mingle.config`` holds the format, tower settings, routing, chunk, sites and ``extra``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: a MINGLE model is written to a .safetensors file")
    tensors: dict[str, Tensor] = {}
    for label, experts in model.experts.items():
        tensors[f"experts.{label}.A"] = experts.A
        tensors[f"experts.{label}.B"] = experts.B
        tensors[f"gates.{label}.weight"] = experts.gate_weight
        tensors[f"gates.{label}.bias"] = experts.gate_bias
    for label, basis in (subspaces or {}).items():
        tensors[f"subspaces.{label}"] = basis
    if include_base:
        tensors.update({f"base.{k}": v for k, v in model.base.items()})
    config = {
        "format": FORMAT,
        "tower": model.config.to_json(),
        "routing": model.routing,
        "chunk": model.chunk,
        "sites": sorted(model.experts, key=_site_order),
        "includes_base": include_base,
        **(extra or {}),
    }
    meta = {"format": "pt", "mingle.config": json.dumps(config, sort_keys=True)}
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def load(
    path: str | Path, pretrained: Mapping[str, Tensor] | None = None, device: torch.device | str = "cpu"
) -> tuple[MingleEncoder, dict[str, Tensor], dict[str, Any]]:
    """Rebuild a saved MINGLE model: (module, subspaces, config). ``pretrained`` supplies θ0 when the file has none."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        raw = (handle.metadata() or {}).get("mingle.config")
        if raw is None:
            raise CheckpointError(f"{path} is not a MINGLE model (no mingle.config metadata)")
        config = json.loads(raw)
        if config.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown MINGLE format {config.get('format')!r} (expected {FORMAT})")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    base = {k.removeprefix("base."): v for k, v in tensors.items() if k.startswith("base.")}
    if not base:
        if pretrained is None:
            raise CheckpointError(
                f"{path} holds no base weights: give the pretrained encoder it was merged on "
                f"({config.get('pretrained', 'not recorded')})"
            )
        base = {k: v.to(device, torch.float32) for k, v in pretrained.items()}
    experts = {}
    for label in config["sites"]:
        experts[label] = SiteExperts(
            tensors[f"experts.{label}.A"],
            tensors[f"experts.{label}.B"],
            tensors[f"gates.{label}.weight"],
            tensors[f"gates.{label}.bias"],
        )
    subspaces = {k.removeprefix("subspaces."): v for k, v in tensors.items() if k.startswith("subspaces.")}
    tower = TowerConfig(**config["tower"])
    module = MingleEncoder(base, tower, experts, config["routing"], config["chunk"])
    return module, subspaces, config


def _site_order(label: str) -> tuple[int, int]:
    layer, site = label.split(".")
    return int(layer), SITES.index(site)
