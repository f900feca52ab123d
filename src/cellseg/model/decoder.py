"""HoVer-Net-style decoder on ViT features, in the CellViT manner.

Four backbone feature maps plus the image itself feed shared skip paths at 1/8, 1/4, 1/2 and
1/1; three branches (NP, HV, NC) upsample the deepest map (at 1/16) and fuse the skips. A ViT's
maps are all at 1/16 and are upsampled to their skip's scale (CellViT); a convolutional
network's stages are already at 1/2, 1/4 and 1/8 and only change their channels.

GroupNorm rather than CellViT's BatchNorm: statistics that do not depend on the batch make a
2-process DDP step equal to a 1-process step on the same global batch, and behave with the small
per-GPU batches a ViT-L at 480x640 allows.

``shared=True`` runs one upsampling path and splits its last 1x1 convolution into the NP, HV and
NC outputs (Cellpose's and StarDist's layout): a third of the decoder's cost, and the class
branch learns from the features that finding and separating cells already needs. It is meant
for a backbone trained from scratch on a CPU; UNI keeps HoVer-Net's separate branches.

``image_skips=True`` adds a small convolutional encoder of the image (strided convolutions to
1/2, 1/4 and 1/8) whose features are added to the skip paths. CellViT's skips at 1/2 to 1/8 are
upsampled ViT features, detailed enough when the ViT is a pretrained foundation model; a ViT
trained from scratch for minutes gives them little, and the HV maps, which must say where in a
40-pixel red cell each pixel lies, came out blurred. With the image's own detail at every scale
they sharpen (docs/ablations.md). UNI does not use it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cellseg.classes import NUM_CLASSES

BRANCHES = {"np": 2, "hv": 2, "nc": NUM_CLASSES}


class FullPrecisionConv2d(nn.Conv2d):
    """A convolution computed in float32 even under autocast. The heads' last layer writes the
    HV maps, whose slope inside a red cell is about 0.02 per pixel: bf16 (8 bits of mantissa)
    would quantise them to about 0.004 near +-1, and the watershed reads that slope. Outside
    autocast (the CPU profiles) it is a plain convolution; its parameters keep their names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(math.gcd(8, cout), cout),
        nn.GELU(),
    )


def up_block(cin: int, cout: int) -> nn.Sequential:
    """x2 upsampling (transposed conv) followed by a conv block."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2), conv_block(cout, cout))


def skip_path(cin: int, reduction: int, target: int, cout: int) -> nn.Sequential:
    """Features at 1/``reduction`` -> ``cout`` channels at 1/``target``: one up block per
    doubling, the first at ``cout * 2**(n-1)`` channels and halving (CellViT's layout), or a
    conv block when the scales already agree."""
    doublings = (reduction // target).bit_length() - 1
    if doublings < 0 or target << doublings != reduction:
        raise ValueError(f"features at 1/{reduction} cannot feed a skip at 1/{target}")
    if doublings == 0:
        return conv_block(cin, cout)
    widths = [cout << (doublings - 1 - i) for i in range(doublings)]
    blocks = [up_block(a, b) for a, b in zip([cin, *widths[:-1]], widths, strict=True)]
    return blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)


def down_block(cin: int, cout: int) -> nn.Sequential:
    """/2 downsampling (a strided conv) followed by a conv block."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.GroupNorm(math.gcd(8, cout), cout),
        nn.GELU(),
        conv_block(cout, cout),
    )


class BranchUpsampler(nn.Module):
    """One output branch: deepest features at 1/16 -> full resolution, fusing the skips."""

    def __init__(self, in_channels: int, width: int, out_channels: int):
        super().__init__()
        w = width
        self.bottleneck = nn.ConvTranspose2d(in_channels, w, 2, stride=2)  # 1/16 -> 1/8
        self.up8 = nn.Sequential(
            conv_block(2 * w, w), conv_block(w, w), nn.ConvTranspose2d(w, w // 2, 2, stride=2)
        )  # -> 1/4
        self.up4 = nn.Sequential(
            conv_block(w, w // 2),
            conv_block(w // 2, w // 2),
            nn.ConvTranspose2d(w // 2, w // 4, 2, stride=2),
        )  # -> 1/2
        self.up2 = nn.Sequential(
            conv_block(w // 2, w // 4),
            conv_block(w // 4, w // 4),
            nn.ConvTranspose2d(w // 4, w // 8, 2, stride=2),
        )  # -> 1/1
        self.head = nn.Sequential(
            conv_block(w // 4, w // 8),
            conv_block(w // 8, w // 8),
            FullPrecisionConv2d(w // 8, out_channels, 1),
        )

    def forward(self, deepest: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        s0, s1, s2, s3 = skips
        x = self.up8(torch.cat([self.bottleneck(deepest), s3], dim=1))
        x = self.up4(torch.cat([x, s2], dim=1))
        x = self.up2(torch.cat([x, s1], dim=1))
        return self.head(torch.cat([x, s0], dim=1))


class HoverDecoder(nn.Module):
    """Shared skip paths and the NP / HV / NC branches.

    Args:
        feature_info: (channels, reduction) of the four backbone maps, shallow to deep; the
            deepest at 1/16 (a ViT: four times (embed_dim, 16)).
        width: channels at 1/8 resolution (CellViT: 512); halved at each finer level.
        shared: one upsampling path for the three branches (see the module's docstring).
        image_skips: a convolutional encoder of the image adds to the skips at 1/2, 1/4, 1/8.
    """

    def __init__(
        self,
        feature_info: list[tuple[int, int]],
        width: int = 512,
        shared: bool = False,
        image_skips: bool = False,
    ):
        super().__init__()
        if width % 16:
            raise ValueError(f"decoder width must be a multiple of 16, got {width}")
        if len(feature_info) != 4 or feature_info[3][1] != 16:
            raise ValueError(f"the decoder takes four maps, the deepest at 1/16: {feature_info}")
        w = self.width = width
        self.shared = shared
        (c1, r1), (c2, r2), (c3, r3), (deepest, _) = feature_info
        self.skip0 = nn.Sequential(conv_block(3, w // 16), conv_block(w // 16, w // 8))  # 1/1
        self.skip1 = skip_path(c1, r1, 2, w // 4)
        self.skip2 = skip_path(c2, r2, 4, w // 2)
        self.skip3 = skip_path(c3, r3, 8, w)
        # from skip0's features at 1/1 down to 1/2, 1/4, 1/8: the channels of skip1..skip3
        self.image_path = (
            nn.ModuleList(
                [down_block(w // 8, w // 4), down_block(w // 4, w // 2), down_block(w // 2, w)]
            )
            if image_skips
            else None
        )
        if shared:
            self.trunk = BranchUpsampler(deepest, w, sum(BRANCHES.values()))
        else:
            self.branches = nn.ModuleDict(
                {name: BranchUpsampler(deepest, w, n) for name, n in BRANCHES.items()}
            )

    def skips(self, image: torch.Tensor, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The skip features at 1/1, 1/2, 1/4 and 1/8 (the first three backbone maps brought to
        those scales, the image's own features added where ``image_skips``)."""
        z1, z2, z3, _ = features
        skips = [self.skip0(image), self.skip1(z1), self.skip2(z2), self.skip3(z3)]
        if self.image_path is not None:
            x = skips[0]
            for level, down in enumerate(self.image_path, start=1):
                x = down(x)
                skips[level] = skips[level] + x
        return skips

    def forward(self, image: torch.Tensor, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``features``: the four backbone maps of ``feature_info``, shallow to deep."""
        z4 = features[3]
        skips = self.skips(image, features)
        if self.shared:
            outputs = self.trunk(z4, skips).split(list(BRANCHES.values()), dim=1)
            return dict(zip(BRANCHES, outputs, strict=True))
        return {name: branch(z4, skips) for name, branch in self.branches.items()}
