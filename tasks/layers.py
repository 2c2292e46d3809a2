"""Serializable Keras layers used inside saved models.

Preprocessing lives *inside* the model so that the saved Keras model and the exported
ONNX graph both take raw RGB pixels (0..255). It is a registered layer rather than a
``Lambda`` so models load in Keras' ``safe_mode`` (Lambda layers run arbitrary code).
"""

from __future__ import annotations

import keras
from keras import ops

# keras.applications' three preprocessing conventions (keras/src/applications/imagenet_utils.py)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

PREPROCESSING_MODES = ("caffe", "tf", "torch", "rescale", "raw")


@keras.saving.register_keras_serializable(package="tlp")
class Preprocess(keras.layers.Layer):
    """Map raw RGB pixels in [0, 255] to what a backbone expects.

    Modes:
        caffe: RGB→BGR, minus the ImageNet mean (VGG16, VGG19, ResNet50 v1).
        tf: scale to [-1, 1] (MobileNet, MobileNetV2/V3, ResNet v2, Inception, Xception).
        torch: scale to [0, 1], then ImageNet mean/std (DenseNet).
        rescale: scale to [0, 1] (the course's CNN).
        raw: pass through (EfficientNet, ConvNeXt, RegNet normalize inside the model).
    """

    def __init__(self, mode: str = "raw", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"Preprocess mode must be one of {PREPROCESSING_MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)
            return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype="float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            x = x / 255.0
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype="float32")
            std = ops.convert_to_tensor(_TORCH_STD, dtype="float32")
            return (x - mean) / std
        if self.mode == "rescale":
            return x / 255.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
