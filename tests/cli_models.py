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


class TinyAttention(nn.Module):
    """A patch embedding, one pre-norm attention block with an MLP, a mean-pooled
    head: an overhead-bound model at small inputs."""

    def __init__(self, in_channels=3, num_classes=10, dim=32, heads=2):
        super().__init__()
        self.embed, self.heads = nn.Conv2d(in_channels, dim, 4, 4), heads
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2, self.head = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))
        return self.head(self.norm(x).mean(1))


def tiny_attention(**kwargs):
    return TinyAttention(**kwargs)
