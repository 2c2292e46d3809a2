"""More devices for one training: ``train.distribute`` as a ``tf.distribute`` strategy.

``none`` is TensorFlow's default strategy (one device). ``mirrored`` is
``tf.distribute.MirroredStrategy`` over ``train.devices`` (default: every local GPU, else
the CPU): a replica per device, gradients all-reduced each step. Everything that creates
variables (loading the backbone, building and compiling the model, restoring a backup)
runs under the strategy's scope (``tasks.train.main``). As the Keras distributed-training
guide says, ``fit`` takes the *global* batch and splits it between the replicas; here
``train.batch_size`` is the batch per replica, so the global batch is ``batch_size x
replicas`` and the learning rates are scaled by the replicas too (the linear scaling rule
for a larger batch): :func:`for_replicas`.
"""

from __future__ import annotations

from tasks.common import StageError, log
from tasks.params import TrainParams, with_changes


def strategy_for(params: TrainParams):
    """The ``tf.distribute`` strategy ``train.distribute`` asks for.

    Raises:
        StageError: a device in ``train.devices`` does not exist here (the message lists
            those that do).
    """
    import tensorflow as tf

    if params.distribute == "none":
        return tf.distribute.get_strategy()
    if params.devices:
        known = {_name(d.name) for d in tf.config.list_logical_devices()}
        missing = [d for d in params.devices if _name(d) not in known]
        if missing:
            raise StageError(
                f"train.devices {missing} not found; this machine has {sorted(known)} "
                "(or set train.devices: null for every local GPU)"
            )
    strategy = tf.distribute.MirroredStrategy(devices=params.devices)
    log.info("train: MirroredStrategy, %d replicas", strategy.num_replicas_in_sync)
    return strategy


def for_replicas(params: TrainParams, replicas: int) -> TrainParams:
    """``params`` with the global batch size and the learning rates for ``replicas``."""
    if replicas == 1:
        return params
    return with_changes(
        params,
        batch_size=params.batch_size * replicas,
        learning_rate=params.learning_rate * replicas,
        fine_tune={"learning_rate": params.fine_tune.learning_rate * replicas},
    )


def _name(device: str) -> str:
    """``/device:GPU:0``, ``/gpu:0`` and ``GPU:0`` alike: ``GPU:0``."""
    return device.upper().replace("/DEVICE:", "").lstrip("/")
