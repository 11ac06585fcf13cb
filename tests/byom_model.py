"""A model a user brings (`model.arch: byom_model:small_cnn`, the tests folder on sys.path):
conv-BN-ReLU twice, a flatten, two linear layers. Its groups: conv1's channels (consumed by
conv2), conv2's (consumed by fc1 behind the flatten, each channel over 16 columns) and fc1's
hidden units (consumed by fc2): the Linear → ReLU → Linear chain is one more group."""
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
