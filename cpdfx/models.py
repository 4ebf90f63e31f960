"""Small built-in vision models: the demo's teacher and the architectures the
tests prune (residual, dense, inception, split, squeeze-excite, grouped,
VGG, U-Net, FPN) and a deeper U-Net for segmentation benchmarks. Each factory takes the number of classes and input channels."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetTiny(nn.Module):
    """A small ResNet: residual adds across stages with projection shortcuts."""

    def __init__(self, num_classes=10, in_channels=3, widths=(16, 32, 64), blocks=(2, 2, 2)):
        super().__init__()
        self.stem = conv_bn(in_channels, widths[0])
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseTiny(nn.Module):
    """Dense blocks: every layer sees the concatenation of all before it."""

    def __init__(self, num_classes=10, in_channels=3, growth=8, layers=3):
        super().__init__()
        self.stem = conv_bn(in_channels, 16)
        self.dense = nn.ModuleList(conv_bn(16 + i * growth, growth) for i in range(layers))
        self.transition = conv_bn(16 + layers * growth, 24, 1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.dense:
            feats.append(layer(torch.cat(feats, 1)))
        x = self.transition(torch.cat(feats, 1))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionTiny(nn.Module):
    """Parallel branches of different kernels, concatenated."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = conv_bn(in_channels, 16)
        self.b1 = conv_bn(16, 8, 1)
        self.b3 = nn.Sequential(conv_bn(16, 8, 1), conv_bn(8, 12, 3))
        self.b5 = nn.Sequential(conv_bn(16, 4, 1), conv_bn(4, 8, 5))
        self.pool = conv_bn(16, 8, 1)
        self.head = nn.Linear(36, num_classes)

    def forward(self, x):
        x = self.stem(x)
        pooled = self.pool(F.max_pool2d(x, 3, 1, 1))
        y = torch.cat([self.b1(x), self.b3(x), self.b5(x), pooled], 1)
        return self.head(y.mean((2, 3)))


class SplitTiny(nn.Module):
    """Channel split and chunk branches (ShuffleNet/GhostNet style)."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = conv_bn(in_channels, 24)
        self.left = conv_bn(8, 8)
        self.right = conv_bn(16, 16)
        self.mix = conv_bn(24, 32, 1)
        self.halves = nn.ModuleList([conv_bn(16, 16), conv_bn(16, 16)])
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        a, b = torch.split(self.stem(x), [8, 16], dim=1)
        x = self.mix(torch.cat([self.left(a), self.right(b)], 1))
        c, d = torch.chunk(x, 2, dim=1)
        x = torch.cat([self.halves[0](c), self.halves[1](d)], 1) + x
        return self.fc(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class SETiny(nn.Module):
    """Squeeze-excite: a channel-wise mul by a gate computed from the channels."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = conv_bn(in_channels, 16)
        self.conv = conv_bn(16, 32)
        self.se = SqueezeExcite(32, 8)
        self.out = conv_bn(32, 32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.se(self.conv(self.stem(x)))
        return self.fc(self.out(x).mean((2, 3)))


class GroupedTiny(nn.Module):
    """Grouped convs (ResNeXt) and depthwise-separable blocks (MobileNet)."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = conv_bn(in_channels, 16)
        self.grouped = conv_bn(16, 32, 3, groups=4)
        self.depthwise = conv_bn(32, 32, 3, groups=32)
        self.expand_dw = conv_bn(32, 64, 3, groups=32)  # depth multiplier 2
        self.pointwise = conv_bn(64, 32, 1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.grouped(self.stem(x))
        x = self.pointwise(self.expand_dw(self.depthwise(x))) + x
        return self.fc(x.mean((2, 3)))


class VGGTiny(nn.Module):
    """Plain conv stack, then flatten(C, H, W) into a linear classifier."""

    def __init__(self, num_classes=10, in_channels=3, image_size=16):
        super().__init__()
        self.features = nn.Sequential(conv_bn(in_channels, 16), nn.MaxPool2d(2), conv_bn(16, 32),
                                      nn.MaxPool2d(2), conv_bn(32, 32))
        side = image_size // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(),
                                        nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class UNetTiny(nn.Module):
    """Encoder-decoder with concatenated skips, transposed-conv and bilinear upsampling."""

    def __init__(self, num_classes=4, in_channels=3):
        super().__init__()
        self.enc1, self.enc2, self.mid = conv_bn(in_channels, 16), conv_bn(16, 32), conv_bn(32, 32)
        self.up2 = nn.ConvTranspose2d(32, 24, 2, 2)
        self.dec2 = conv_bn(24 + 32, 24)
        self.dec1 = conv_bn(24 + 16, 16)
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="bilinear"), e1], 1))
        return self.head(d1)


class FPNTiny(nn.Module):
    """Feature pyramid: lateral 1x1 convs, top-down nearest upsampling and adds,
    and a dict of outputs (class map and per-level features)."""

    def __init__(self, num_classes=4, in_channels=3):
        super().__init__()
        self.c1, self.c2, self.c3 = conv_bn(in_channels, 16), conv_bn(16, 32, stride=2), conv_bn(32, 48, stride=2)
        self.lat = nn.ModuleList([nn.Conv2d(c, 24, 1) for c in (16, 32, 48)])
        self.smooth = conv_bn(24, 24)
        self.cls = nn.Conv2d(24, num_classes, 1)
        self.box = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        f1 = self.c1(x)
        f2 = self.c2(f1)
        f3 = self.c3(f2)
        p3 = self.lat[2](f3)
        p2 = self.lat[1](f2) + F.interpolate(p3, scale_factor=2.0, mode="nearest")
        p1 = self.smooth(self.lat[0](f1) + F.interpolate(p2, scale_factor=2.0, mode="nearest"))
        return {"classes": self.cls(p1), "boxes": self.box(p2)}


class UNet(nn.Module):
    """U-Net of len(widths) levels: two 3x3 conv-BN-ReLU per level, max-pool
    down, bilinear up, the encoder's map concatenated before each decoder
    level. Its receptive field doubles its growth with each level (68 px for
    the encoder alone with four levels, against about 24 px for UNetTiny), so
    each pixel can be classified by the whole object it lies on."""

    def __init__(self, num_classes=4, in_channels=3, widths=(8, 16, 32, 64)):
        super().__init__()
        ins = (in_channels,) + tuple(widths[:-1])
        self.down = nn.ModuleList([nn.Sequential(conv_bn(i, o), conv_bn(o, o)) for i, o in zip(ins, widths)])
        self.up = nn.ModuleList([nn.Sequential(conv_bn(deep + skip, skip), conv_bn(skip, skip))
                                 for deep, skip in zip(widths[:0:-1], widths[-2::-1])])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for i, level in enumerate(self.down):
            x = level(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        for level, skip in zip(self.up, skips[-2::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = level(torch.cat([x, skip], 1))
        return self.head(x)


MODELS = {
    "resnet": ResNetTiny, "dense": DenseTiny, "inception": InceptionTiny, "split": SplitTiny,
    "se": SETiny, "grouped": GroupedTiny, "vgg": VGGTiny, "unet": UNetTiny, "fpn": FPNTiny,
    "unet4": UNet,
}
