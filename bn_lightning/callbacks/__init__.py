"""What observes training, as Lightning callbacks: monitors of BN and activations, TensorBoard's side-by-side
layout, the probes of why BN helps, precise BN, LSUV and Batch Renorm's schedule in epochs.

Imports ``bn_lightning.nn`` and ``bn_lightning.training``; the monitors find what they watch by type
(``find_layers``), so they work in any LightningModule, not only around our networks.
"""

from bn_lightning.callbacks.base import EveryNSteps, LayerMonitor, block_name, channel_subset, find_layers
from bn_lightning.callbacks.lsuv import LSUV
from bn_lightning.callbacks.monitors import ACTIVATIONS, PERCENTILES, ActivationMonitor, BatchNormMonitor, ExamplesPerSecond
from bn_lightning.callbacks.precise_bn import PreciseBN
from bn_lightning.callbacks.renorm import BatchRenormSchedule
from bn_lightning.callbacks.probes import GradientICS, LandscapeProbe, RepresentationProbe, WeightNormMonitor
from bn_lightning.callbacks.tensorboard import TensorBoardComparison

__all__ = [
    "ACTIVATIONS", "PERCENTILES", "ActivationMonitor", "BatchNormMonitor", "BatchRenormSchedule", "EveryNSteps", "ExamplesPerSecond",
    "GradientICS", "LSUV", "LandscapeProbe", "LayerMonitor", "PreciseBN", "RepresentationProbe",
    "TensorBoardComparison", "WeightNormMonitor", "block_name", "channel_subset", "find_layers",
]
