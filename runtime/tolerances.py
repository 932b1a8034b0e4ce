"""How close an exported engine must stay to the model it came from: one owner for the numbers
the exporter's self-checks (``ami-export``) and the parity suite (``ami-bench parity``) share.

* fp32 engines reproduce their float32 reference probability by probability;
* reduced precisions (int8, fp16, bf16) are held to the task metrics instead: balanced accuracy
  (at the artefact's threshold) and AUROC within these distances of the float model's.
"""

from __future__ import annotations

FP32_PROB_TOL = 1e-4  # fp32 engine vs its float32 reference: max |delta probability|
REDUCED_BA_TOL = 0.01  # int8 / fp16 / bf16 vs float: largest accepted |delta balanced accuracy|
REDUCED_AUROC_TOL = 0.005  # int8 / fp16 / bf16 vs float: largest accepted |delta AUROC|
