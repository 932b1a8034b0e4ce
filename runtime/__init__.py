"""ami.runtime: the torch-free base layer.

Everything an edge box needs (datasets, folds, metrics, preprocessing, ONNX Runtime / TensorRT
inference) lives here and imports only numpy, pillow and an inference engine. Every other layer
(``ami.train``, ``ami.export``, ``ami.bench``) builds on it.
"""

__version__ = "0.1.0"

# The distribution name on the package index: `pip install ami-mitosis` (the name `ami` belongs to an
# unrelated package). The import name stays `ami` (docs/naming.md says why). Install hints in
# messages use this constant, e.g. f"pip install '{DIST_NAME}[slides]'".
DIST_NAME = "ami-mitosis"

CLASS_NAMES = ("Normal", "Atypical")  # index = label; Atypical is the positive class (1)
