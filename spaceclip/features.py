"""What the decoder reads: the frozen encoder's features of a batch, and nothing else.

    Features = {"tokens": {layer: (B, g, g, C) channels-last}, "global": (B, C) or None}

`FrozenEncoder` returns it, the feature store's loaders hand it to the decoder (their targets, sample positions and
flip flags travel beside it, never inside), and `SpaceClipDecoder.forward` reads only these two keys. It is a
`TypedDict` rather than a class of its own so that a plain dict of these keys, as the encoder and the exporters
build it, is one too. `global` is the pooled vector FiLM reads; variants without FiLM accept None.
"""

from __future__ import annotations

from typing import Optional, TypedDict

import torch

Features = TypedDict("Features", {"tokens": dict[int, torch.Tensor], "global": Optional[torch.Tensor]})
