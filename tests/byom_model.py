"""A model a user brings (`model.arch: byom_model:small_cnn`, the tests folder on sys.path):
conv-BN-ReLU twice, a flatten, two linear layers. Its groups: conv1's channels (consumed by
conv2), conv2's (consumed by fc1 behind the flatten, each channel over 16 columns) and fc1's
hidden units (consumed by fc2): the Linear → ReLU → Linear chain is one more group. Beside it,
BN subclasses, a shared conv, a literal view, and `tiny_resnext` (grouped convs)."""
import torch
import torch.nn as nn


def small_cnn(num_classes: int = 10, width: int = 8, hidden: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(1),
        nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class BatchNormAct(nn.BatchNorm2d):
    """A BN subclass with its activation inside, as timm's BatchNormAct2d: narrowed like any BN."""

    def __init__(self, num_features: int, act=nn.Hardswish):
        super().__init__(num_features)
        self.act = act()

    def forward(self, x):
        return self.act(super().forward(x))


class BatchNormScaled(nn.BatchNorm2d):
    """A BN subclass with a per-channel tensor of its own, which no pruner cuts: not narrowable."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.extra_scale = nn.Parameter(torch.linspace(0.5, 1.5, num_features))

    def forward(self, x):
        return super().forward(x) * self.extra_scale.view(1, -1, 1, 1)


def bn_subclass_cnn(num_classes: int = 10, width: int = 8) -> nn.Module:
    """conv1 → BatchNormAct (narrowable group), conv2 → BatchNormScaled (not narrowable) → fc."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), BatchNormAct(width), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), BatchNormScaled(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(2 * width, num_classes))


class SharedConvNet(nn.Module):
    """One conv called twice per forward (weight sharing), between two plain groups."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.shared = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.shared(torch.relu(self.shared(x)))
        return self.head(x.mean((2, 3)))


class LiteralViewNet(nn.Module):
    """A flatten written with a literal width (view(-1, 16 * 16)): traced fine, but a narrowed
    model's forward breaks."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(4), nn.Linear(16 * 16, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(x.view(-1, 16 * 16))


class GroupedBottleneck(nn.Module):
    """conv1 (1x1) → BN → ReLU → conv2 (3x3, `groups` conv groups) → BN → ReLU [→ squeeze-excitation
    gate] → conv3 (1x1) → BN, added to a projection shortcut: a ResNeXt bottleneck (RegNetY's with `se`)."""

    def __init__(self, in_ch: int, mid: int, out_ch: int, groups: int, se: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(mid)
        self.se = nn.Sequential(nn.Conv2d(mid, mid // 4, 1), nn.ReLU(), nn.Conv2d(mid // 4, mid, 1)) if se else None
        self.conv3, self.bn3 = nn.Conv2d(mid, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x):
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        if self.se is not None:
            y = y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        return torch.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


def tiny_resnext(num_classes: int = 10, width: int = 16, groups: int = 4) -> nn.Module:
    """Stem, a ResNeXt bottleneck, a RegNetY-like one (with SE), then the mean and a classifier."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        GroupedBottleneck(width, width, 2 * width, groups),
        GroupedBottleneck(2 * width, 2 * width, 2 * width, groups, se=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(2 * width, num_classes))
