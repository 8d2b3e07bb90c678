"""A network that models.py does not register, to run through the three stages as your own:
depthwise-separable blocks (MobileNet's, Howard et al. 2017), a grouped and dilated conv,
batch-norm, and an fc classifier. About 23k parameters at width 32; 32x32 inputs or larger.

    python pruning.py --model=examples/separable.py:separable_net --dataset=cifar10 --erk_alive=0.3 ...

The stages import this file only because the --model setting names it."""
import torch.nn as nn


def _conv_bn(cin, cout, kernel, stride=1, groups=1, dilation=1):
    """conv (no bias: the batch-norm's shift replaces it) -> batch-norm -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, dilation * (kernel // 2), dilation, groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SeparableNet(nn.Module):
    """x: (N, C, H, W) -> logits (N, num_classes). A 3x3 stem, two depthwise-separable blocks
    (3x3 depthwise, then 1x1 pointwise) that halve the map, a 3x3 conv in 4 groups with
    dilation 2 between them, global average pooling and an fc layer."""

    def __init__(self, in_channels=3, num_classes=10, width=32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w, 3),
            _conv_bn(w, w, 3, stride=2, groups=w), _conv_bn(w, 2 * w, 1),            # separable, /2
            _conv_bn(2 * w, 2 * w, 3, groups=4, dilation=2),                         # grouped, dilated
            _conv_bn(2 * w, 2 * w, 3, stride=2, groups=2 * w), _conv_bn(2 * w, 4 * w, 1))  # separable, /2
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def separable_net(in_shape=(3, 32, 32), num_classes=10, width=32):
    """The factory --model names: models.build_model passes the data set's in_shape and
    num_classes, and the model_args setting (e.g. {'width': 64}) as keywords."""
    return SeparableNet(in_shape[0], num_classes, width)
