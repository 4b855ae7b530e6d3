"""TensorBoard tags that training writes and the comparison runner reads, defined once for both sides.

Imports nothing, so that ``bn_lightning.compare`` reads runs without importing Lightning."""

# The step at which training diverged, logged by Classifier before it raises NonFiniteLossError: the
# comparison runner reads it from the run's events, as data, rather than from the error's message.
DIVERGED_TAG = "train/diverged_at_step"
# The percentiles ActivationMonitor logs (act/<block>/unit/p15 ...) and the runner plots as Ioffe & Szegedy's bands.
PERCENTILES = (15, 50, 85)
