"""Pipeline stages: one module per DVC stage (fetch, prepare, backbone, train, evaluate, export).

Python runs this file before any stage module, so it is where TensorFlow's C++ logging is
turned down: the variable must be set before TensorFlow is imported, and some stages import
it first thing. Without it, ``dvc repro`` prints TensorFlow's start-up notes and harmless
``E ... node_def_util.cc`` lines; real failures still reach the stage as Python exceptions.
``TLP_VERBOSE=1`` (``tlp run --verbose``) keeps them all; a value you set yourself wins.
"""

import os

if os.environ.get("TLP_VERBOSE") != "1":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
