"""ami.runtime: the torch-free base layer.

Everything an edge box needs (datasets, folds, metrics, preprocessing, ONNX Runtime / TensorRT
inference) lives here and imports only numpy, pillow and an inference engine. Every other layer
(``ami.train``, ``ami.export``, ``ami.bench``) builds on it.
"""

__version__ = "0.1.0"

DIST_NAME = "ami"  # the distribution's name on PyPI: every install hint says `pip install 'DIST_NAME[extra]'`

CLASS_NAMES = ("Normal", "Atypical")  # index = label; Atypical is the positive class (1)
