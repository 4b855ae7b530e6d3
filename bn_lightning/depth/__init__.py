"""Where BN's effect lives in depth (issue 25): measurements on :class:`~bn_lightning.nn.DeepMLP` and
:class:`~bn_lightning.nn.DeepConvNet`. :mod:`.at_init`: gradients and representations at initialization and after
a few steps (``python -m bn_lightning.depth.at_init --out results/depth_init``); the predictions they are judged
against are in docs/predictions.md.
"""
