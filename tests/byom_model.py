"""A model a user brings (`model.arch: byom_model:small_cnn`, the tests folder on sys.path):
conv-BN-ReLU twice, a flatten, two linear layers. Its groups: conv1's channels (consumed by
conv2), conv2's (consumed by fc1 behind the flatten, each channel over 16 columns) and fc1's
hidden units (consumed by fc2): the Linear → ReLU → Linear chain is one more group."""
import torch.nn as nn


def small_cnn(num_classes: int = 10, width: int = 8, hidden: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(1),
        nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
