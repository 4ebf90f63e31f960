"""Model factories the CLI tests name as package.module:factory."""
import torch.nn as nn

from cpdfx.models import ResNetTiny


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: not capturable
            return x * 2
        return x


def data_dependent():
    return DataDependent()


def small_digits_net():
    return ResNetTiny(num_classes=10, in_channels=1, widths=(8, 16, 32), blocks=(1, 1, 1))
