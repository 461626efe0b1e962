"""The inter-pixel relation network (IRN) that SFC trains on IR labels (docs/method.md section 7.2).

A frozen ResNet (output stride 16) feeds two new branches at stride 4: a class-boundary (edge) map and a
displacement field. Affinities between pixel pairs within a radius are ``1 - max(edge on the path between them)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import ResNetBackbone

STRIDE = 16  # network stride: an input padded to a multiple of it keeps every feature grid aligned
FEATURE_STRIDE = 4  # resolution of the edge map and the displacement field
EDGE_CANVAS = 512  # the reference's inference canvas for the edge map (the crop IRN trains on)
_EPS = 1e-5


def feature_size(height: int, width: int) -> tuple[int, int]:
    """Size of the stride-4 outputs for an input of (height, width)."""
    return (height - 1) // FEATURE_STRIDE + 1, (width - 1) // FEATURE_STRIDE + 1


def _head(c_in: int, c_out: int, groups: int, upsample: int = 1) -> nn.Sequential:
    """1x1 conv -> GroupNorm -> (bilinear upsample) -> ReLU, as IRN's side heads."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(groups, c_out)]
    if upsample > 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MeanShift(nn.Module):
    """Holds the mean displacement of the training images; subtracted from the output in eval mode only."""

    running_mean: torch.Tensor

    def __init__(self, channels: int = 2):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


class IRNet(nn.Module):
    """IRN on a frozen ResNet: ``forward`` returns edge logits (N, 1, h, w) and displacements (N, 2, h, w) at
    stride 4, with (h, w) = :func:`feature_size` of the input.

    The backbone's BatchNorm stays in eval mode whatever ``train()`` is called with. Its weights are frozen and run
    without autograd (the reference), unless ``train_backbone``: then every stage gets gradients
    (:meth:`backbone_parameters`), a deviation for backbones without ImageNet features.
    """

    def __init__(self, backbone: str = "resnet50", train_backbone: bool = False):
        super().__init__()
        self.train_backbone = train_backbone
        self.backbone = ResNetBackbone(backbone, trainable_from=0 if train_backbone else 4, norm="frozen")
        self.backbone.requires_grad_(train_backbone)
        stem = self.backbone.stage0[0]
        assert isinstance(stem, nn.Conv2d), stem
        c0 = stem.out_channels
        c1, c2, c3, c4 = self.backbone.channels.as_tuple()
        self.edge_heads = nn.ModuleList([
            _head(c0, 32, 4), _head(c1, 32, 4), _head(c2, 32, 4, 2), _head(c3, 32, 4, 4), _head(c4, 32, 4, 4)])
        self.edge_out = nn.Conv2d(160, 1, 1, bias=True)
        self.dp_heads = nn.ModuleList([
            _head(c0, 64, 8), _head(c1, 128, 16), _head(c2, 256, 16), _head(c3, 256, 16, 2), _head(c4, 256, 16, 2)])
        self.dp_fuse = _head(768, 256, 16, 2)
        self.dp_out = nn.Sequential(_head(448, 256, 16), nn.Conv2d(256, 2, 1, bias=False))
        self.mean_shift = MeanShift(2)
        self.backbone.eval()

    def train(self, mode: bool = True) -> IRNet:
        super().train(mode)
        self.backbone.eval()
        return self

    def edge_layers(self) -> list[nn.Module]:
        return [*self.edge_heads, self.edge_out]

    def displacement_layers(self) -> list[nn.Module]:
        return [*self.dp_heads, self.dp_fuse, self.dp_out]

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Trainable parameters as (edge branch, displacement branch)."""
        return ([p for m in self.edge_layers() for p in m.parameters()],
                [p for m in self.displacement_layers() for p in m.parameters()])

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's weights when ``train_backbone``, else none."""
        return list(self.backbone.parameters()) if self.train_backbone else []

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of stage0..stage4 (strides 4, 4, 8, 16, 16), without autograd unless ``train_backbone``."""
        features = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_backbone):
            for stage in self.backbone.stages:
                x = stage(x)
                features.append(x)
        return features

    def _edge(self, features: list[torch.Tensor]) -> torch.Tensor:
        h, w = features[0].shape[2:]
        sides = [head(f)[..., :h, :w] for head, f in zip(self.edge_heads, features)]
        return self.edge_out(torch.cat(sides, dim=1))

    def edge_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Edge logits (N, 1, h, w) only (inference)."""
        return self._edge(self._features(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self._features(x)
        d0, d1, d2, d3, d4 = (head(f) for head, f in zip(self.dp_heads, features))
        h8, w8 = d2.shape[2:]
        h4, w4 = d0.shape[2:]
        fused = self.dp_fuse(torch.cat([d2, d3[..., :h8, :w8], d4[..., :h8, :w8]], dim=1))[..., :h4, :w4]
        displacement = self.mean_shift(self.dp_out(torch.cat([d0, d1, fused], dim=1)))
        return self._edge(features), displacement


class PathIndex:
    """Pixel pairs within ``radius`` on an (h, w) grid and the pixels on the straight path between them.

    Sources are the pixels of rows [0, h - r) and columns [r, w - r), with r = radius - 1, so that every
    destination ``source + (dy, dx)`` lies inside the grid. Directions are the (dy, dx) with dy >= 0, one of each
    +-pair (dy > 0, or dy = 0 and dx > 0) and dy^2 + dx^2 < radius^2, in row-major order and then grouped by path
    length. The path of a direction is every offset in the box spanned by (0, 0) and (dy, dx) whose distance to
    the line through them is below 1, both ends included.

    Attributes: ``directions`` (D, 2) (dy, dx); ``src`` (S,) flat source indices; ``dst`` (D, S) flat destination
    indices; ``paths`` a list of (D_g, L_g, S) flat indices of the path pixels, one per path length L_g, whose
    concatenation over groups follows ``directions``.
    """

    def __init__(self, radius: int, size: tuple[int, int]):
        if radius < 2:
            raise ValueError(f"radius must be at least 2, got {radius}")
        height, width = size
        reach = radius - 1
        if height <= reach or width <= 2 * reach:
            raise ValueError(f"a {height}x{width} grid is too small for radius {radius}")
        self.radius, self.size = radius, (height, width)
        dy, dx = torch.meshgrid(torch.arange(reach + 1), torch.arange(-reach, reach + 1), indexing="ij")
        dy, dx = dy.flatten(), dx.flatten()
        keep = ((dy > 0) | (dx > 0)) & (dy ** 2 + dx ** 2 < radius ** 2)
        directions = torch.stack([dy[keep], dx[keep]], dim=1)
        # on_path[d, u]: offset u = (dy[u], dx[u]) of the candidate grid lies on the path of direction d
        ty, tx = directions[:, :1], directions[:, 1:]
        on_path = ((dy[None] <= ty) & (dx[None] >= tx.clamp(max=0)) & (dx[None] <= tx.clamp(min=0))
                   & ((ty * dx[None] - tx * dy[None]) ** 2 < ty ** 2 + tx ** 2))
        lengths = on_path.sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        self.directions = directions[order]

        sy, sx = torch.meshgrid(torch.arange(height - reach), torch.arange(reach, width - reach), indexing="ij")
        self.src = (sy * width + sx).flatten()
        flat_offset = dy * width + dx
        self.dst = self.src[None] + (self.directions[:, 0] * width + self.directions[:, 1])[:, None]
        on_path, lengths = on_path[order], lengths[order]
        self.paths = []
        for length in torch.unique(lengths).tolist():
            group = on_path[lengths == length]  # (D_g, U), each row with ``length`` offsets on the path
            offsets = flat_offset.expand_as(group)[group].view(len(group), length)
            self.paths.append(self.src[None, None] + offsets[:, :, None])

    @property
    def num_directions(self) -> int:
        return len(self.directions)

    def to(self, device: torch.device | str) -> PathIndex:
        """Move the index tensors to ``device`` (in place); returns self."""
        self.directions, self.src, self.dst = (t.to(device) for t in (self.directions, self.src, self.dst))
        self.paths = [p.to(device) for p in self.paths]
        return self


def path_affinity(edge: torch.Tensor, paths: PathIndex) -> torch.Tensor:
    """``1 - max(edge along the path)`` for every pair: (N, h, w) edge probabilities -> (N, D, S).

    The maximising path pixel is found without autograd and then gathered, so memory stays O(N*D*S); values and
    gradients (to the first maximum) equal those of a max over the gathered paths.
    """
    if tuple(edge.shape[1:]) != paths.size:
        raise ValueError(f"edge map of size {tuple(edge.shape[1:])} does not match the path index {paths.size}")
    flat = edge.flatten(1)
    n = flat.shape[0]
    with torch.no_grad():
        winners = []
        for group in paths.paths:
            values = flat[:, group]  # (N, D_g, L_g, S)
            arg = values.argmax(dim=2, keepdim=True)
            winners.append(torch.gather(group.expand(n, -1, -1, -1), 2, arg).squeeze(2))
        winner = torch.cat(winners, dim=1)
    return 1 - torch.gather(flat, 1, winner.flatten(1)).view_as(winner)


def pair_displacement(displacement: torch.Tensor, paths: PathIndex) -> torch.Tensor:
    """``disp(src) - disp(dst)`` for every pair: (N, 2, h, w) -> (N, 2, D, S)."""
    flat = displacement.flatten(2)
    return flat[:, :, paths.src][:, :, None] - flat[:, :, paths.dst]


def affinity_labels(label: torch.Tensor, paths: PathIndex, num_labels: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bg_pos, fg_pos, neg) float masks (N, D, S) of a stride-4 IR label map (N, h, w).

    A pair is valid when both labels are below ``num_labels`` (classes incl. background; 255 is ignored); valid
    pairs with equal labels are positive (background or foreground by the label), the others negative.
    """
    flat = label.flatten(1).long()
    src, dst = flat[:, paths.src][:, None], flat[:, paths.dst]
    valid = (src < num_labels) & (dst < num_labels)
    equal = src == dst
    positive = equal & valid
    return ((positive & (src == 0)).float(), (positive & (src > 0)).float(), (~equal & valid).float())


@dataclass
class IRNLosses:
    """The scalar loss terms of one step."""

    bg_pos: torch.Tensor
    fg_pos: torch.Tensor
    neg: torch.Tensor
    dp_fg: torch.Tensor
    dp_bg: torch.Tensor
    total: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        terms = {"loss": self.total, "loss_bg_pos": self.bg_pos, "loss_fg_pos": self.fg_pos, "loss_neg": self.neg,
                 "loss_dp_fg": self.dp_fg, "loss_dp_bg": self.dp_bg}
        return {key: value.item() for key, value in terms.items()}


def irn_losses(edge_logits: torch.Tensor, displacement: torch.Tensor, label: torch.Tensor, paths: PathIndex,
               num_labels: int) -> IRNLosses:
    """IRN's losses for a batch (docs/method.md section 7.2): masked means of the affinity and displacement terms.

    ``total = (pos + neg)/2 + (dp_fg + dp_bg)/2`` with ``pos = bg_pos/2 + fg_pos/2``.
    """
    bg_pos, fg_pos, neg = affinity_labels(label, paths, num_labels)
    aff = path_affinity(torch.sigmoid(edge_logits[:, 0]), paths)
    pos_term = -torch.log(aff + _EPS)
    neg_term = -torch.log(1 + _EPS - aff)
    bg_pos_loss = (bg_pos * pos_term).sum() / (bg_pos.sum() + _EPS)
    fg_pos_loss = (fg_pos * pos_term).sum() / (fg_pos.sum() + _EPS)
    neg_loss = (neg * neg_term).sum() / (neg.sum() + _EPS)
    pair = pair_displacement(displacement, paths)
    target = paths.directions.t().to(pair.dtype)[None, :, :, None]
    dp_fg = ((pair - target).abs() * fg_pos[:, None]).sum() / (2 * fg_pos.sum() + _EPS)
    dp_bg = (pair.abs() * bg_pos[:, None]).sum() / (2 * bg_pos.sum() + _EPS)
    total = (bg_pos_loss / 2 + fg_pos_loss / 2 + neg_loss) / 2 + (dp_fg + dp_bg) / 2
    return IRNLosses(bg_pos_loss, fg_pos_loss, neg_loss, dp_fg, dp_bg, total)


def edge_canvas_size(height: int, width: int, canvas: int = EDGE_CANVAS) -> tuple[int, int]:
    """The padded input size (H', W') of :func:`edge_map` for an image of (height, width).

    ``canvas`` > 0: the reference's ``canvas`` x ``canvas`` square (512, the crop IRN trains on) when the image fits;
    a larger image, where the reference fails, gets a square whose side is its longer side rounded up to a multiple
    of 16. ``canvas`` 0: each side rounded up to a multiple of 16 only.
    """
    if canvas == 0:
        return height + -height % STRIDE, width + -width % STRIDE
    longer = max(height, width)
    side = max(canvas, longer + -longer % STRIDE)
    return side, side


@torch.no_grad()
def edge_map(model: IRNet, image: torch.Tensor, canvas: int = EDGE_CANVAS) -> torch.Tensor:
    """Class-boundary probabilities (h, w) = :func:`feature_size` of a normalised (3, H, W) image of any size.

    The image and its flip run as one batch of 2, zero-padded right and bottom to :func:`edge_canvas_size`; the
    result is ``sigmoid(e(x)/2 + flip(e(flip(x)))/2)`` cropped to the image's stride-4 size, as the reference's
    ``EdgeDisplacement``. The edge heads' GroupNorm statistics cover the padding too, so the canvas changes the
    values (docs/refinement.md).
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    if canvas < 0 or canvas % STRIDE:
        raise ValueError(f"edge canvas must be 0 or a positive multiple of {STRIDE}, got {canvas}")
    height, width = image.shape[1:]
    padded_height, padded_width = edge_canvas_size(height, width, canvas)
    device = next(model.parameters()).device
    pair = torch.stack([image, image.flip(-1)]).to(device)
    pair = F.pad(pair, (0, padded_width - width, 0, padded_height - height))
    h, w = feature_size(height, width)
    logits = model.edge_logits(pair)[:, 0, :h, :w]
    return torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)
