"""The paper's published numbers: Table 3 of Banerjee et al. (:data:`PAPER_CITATION`), for
``ami-bench table --paper``. Torch-free data only."""

from __future__ import annotations

# The paper's published Table 3 (PAPER_CITATION), for ``ami-bench table --paper``:
# (model, method) -> test set -> metric -> (mean, std) over its 5 folds.
PAPER_CITATION = ("Banerjee et al., 'Benchmarking Deep Learning and Vision Foundation Models for Atypical vs. "
                  "Normal Mitosis Classification with Cross-Dataset Evaluation', arXiv 2506.21444 (MELBA), Table 3: "
                  "mean ± std over 5 folds")
PAPER_TABLE3: dict[tuple[str, str], dict[str, dict[str, tuple[float, float]]]] = {
    ("efficientnetv2_m", "full"): {
        "AMi-Br-test": {"balanced_accuracy": (0.6488, 0.1265), "auroc": (0.7124, 0.1608)},
        "AtNorM-Br": {"balanced_accuracy": (0.6457, 0.1055), "auroc": (0.7055, 0.1250)},
        "AtNorM-MD": {"balanced_accuracy": (0.6034, 0.1166), "auroc": (0.6721, 0.1279)},
    },
    ("vit_large_patch16_224", "full"): {
        "AMi-Br-test": {"balanced_accuracy": (0.7552, 0.0191), "auroc": (0.8634, 0.0104)},
        "AtNorM-Br": {"balanced_accuracy": (0.7570, 0.0171), "auroc": (0.8478, 0.0189)},
        "AtNorM-MD": {"balanced_accuracy": (0.7439, 0.0149), "auroc": (0.8396, 0.0213)},
    },
    ("swin_base_patch4_window7_224", "full"): {
        "AMi-Br-test": {"balanced_accuracy": (0.7491, 0.1061), "auroc": (0.8451, 0.0996)},
        "AtNorM-Br": {"balanced_accuracy": (0.7213, 0.1116), "auroc": (0.8272, 0.0879)},
        "AtNorM-MD": {"balanced_accuracy": (0.7226, 0.1048), "auroc": (0.8069, 0.1213)},
    },
    ("uni", "linear"): {
        "AMi-Br-test": {"balanced_accuracy": (0.6477, 0.0108), "auroc": (0.7171, 0.0080)},
        "AtNorM-Br": {"balanced_accuracy": (0.6217, 0.0015), "auroc": (0.6774, 0.0136)},
        "AtNorM-MD": {"balanced_accuracy": (0.5715, 0.0153), "auroc": (0.6241, 0.0222)},
    },
    ("uni2_h", "linear"): {
        "AMi-Br-test": {"balanced_accuracy": (0.6472, 0.0138), "auroc": (0.7087, 0.0107)},
        "AtNorM-Br": {"balanced_accuracy": (0.6612, 0.0169), "auroc": (0.7296, 0.0115)},
        "AtNorM-MD": {"balanced_accuracy": (0.5919, 0.0162), "auroc": (0.6297, 0.0173)},
    },
    ("virchow", "linear"): {
        "AMi-Br-test": {"balanced_accuracy": (0.6452, 0.0139), "auroc": (0.7010, 0.0077)},
        "AtNorM-Br": {"balanced_accuracy": (0.6441, 0.0212), "auroc": (0.7037, 0.0107)},
        "AtNorM-MD": {"balanced_accuracy": (0.5758, 0.0172), "auroc": (0.6175, 0.0227)},
    },
    ("virchow2", "linear"): {
        "AMi-Br-test": {"balanced_accuracy": (0.6403, 0.0079), "auroc": (0.7040, 0.0052)},
        "AtNorM-Br": {"balanced_accuracy": (0.6667, 0.0133), "auroc": (0.7201, 0.0060)},
        "AtNorM-MD": {"balanced_accuracy": (0.5652, 0.0064), "auroc": (0.5878, 0.0211)},
    },
    ("prov_gigapath", "linear"): {
        "AMi-Br-test": {"balanced_accuracy": (0.6091, 0.0140), "auroc": (0.6569, 0.0132)},
        "AtNorM-Br": {"balanced_accuracy": (0.6005, 0.0091), "auroc": (0.6323, 0.0125)},
        "AtNorM-MD": {"balanced_accuracy": (0.5601, 0.0153), "auroc": (0.5818, 0.0129)},
    },
    ("h_optimus_0", "linear"): {
        "AMi-Br-test": {"balanced_accuracy": (0.6372, 0.0164), "auroc": (0.6926, 0.0062)},
        "AtNorM-Br": {"balanced_accuracy": (0.6122, 0.0185), "auroc": (0.6903, 0.0217)},
        "AtNorM-MD": {"balanced_accuracy": (0.5603, 0.0400), "auroc": (0.5935, 0.0423)},
    },
    ("h_optimus_1", "linear"): {
        "AMi-Br-test": {"balanced_accuracy": (0.5918, 0.0165), "auroc": (0.6494, 0.0108)},
        "AtNorM-Br": {"balanced_accuracy": (0.6139, 0.0195), "auroc": (0.6696, 0.0193)},
        "AtNorM-MD": {"balanced_accuracy": (0.5915, 0.0308), "auroc": (0.6436, 0.0499)},
    },
    ("uni", "lora"): {
        "AMi-Br-test": {"balanced_accuracy": (0.7952, 0.0092), "auroc": (0.8839, 0.0059)},
        "AtNorM-Br": {"balanced_accuracy": (0.7183, 0.0226), "auroc": (0.7979, 0.0142)},
        "AtNorM-MD": {"balanced_accuracy": (0.7069, 0.0278), "auroc": (0.8222, 0.0224)},
    },
    ("uni2_h", "lora"): {
        "AMi-Br-test": {"balanced_accuracy": (0.7138, 0.0121), "auroc": (0.8153, 0.0211)},
        "AtNorM-Br": {"balanced_accuracy": (0.7301, 0.0152), "auroc": (0.8228, 0.0143)},
        "AtNorM-MD": {"balanced_accuracy": (0.6914, 0.0321), "auroc": (0.7616, 0.0415)},
    },
    ("virchow", "lora"): {
        "AMi-Br-test": {"balanced_accuracy": (0.7878, 0.0250), "auroc": (0.8891, 0.0150)},
        "AtNorM-Br": {"balanced_accuracy": (0.7696, 0.0198), "auroc": (0.8540, 0.0200)},
        "AtNorM-MD": {"balanced_accuracy": (0.7705, 0.0287), "auroc": (0.8641, 0.0247)},
    },
    ("virchow2", "lora"): {
        "AMi-Br-test": {"balanced_accuracy": (0.8135, 0.0145), "auroc": (0.9026, 0.0051)},
        "AtNorM-Br": {"balanced_accuracy": (0.7632, 0.0190), "auroc": (0.8579, 0.0117)},
        "AtNorM-MD": {"balanced_accuracy": (0.7424, 0.0305), "auroc": (0.8503, 0.0171)},
    },
    ("prov_gigapath", "lora"): {
        "AMi-Br-test": {"balanced_accuracy": (0.7602, 0.0113), "auroc": (0.8682, 0.0122)},
        "AtNorM-Br": {"balanced_accuracy": (0.7263, 0.0296), "auroc": (0.8077, 0.0184)},
        "AtNorM-MD": {"balanced_accuracy": (0.7007, 0.0228), "auroc": (0.8073, 0.0259)},
    },
    ("h_optimus_0", "lora"): {
        "AMi-Br-test": {"balanced_accuracy": (0.5888, 0.0766), "auroc": (0.6159, 0.1276)},
        "AtNorM-Br": {"balanced_accuracy": (0.5901, 0.0827), "auroc": (0.6224, 0.1220)},
        "AtNorM-MD": {"balanced_accuracy": (0.5406, 0.0619), "auroc": (0.5826, 0.1263)},
    },
    ("h_optimus_1", "lora"): {
        "AMi-Br-test": {"balanced_accuracy": (0.5908, 0.0909), "auroc": (0.6362, 0.1143)},
        "AtNorM-Br": {"balanced_accuracy": (0.5699, 0.0752), "auroc": (0.6352, 0.1091)},
        "AtNorM-MD": {"balanced_accuracy": (0.5617, 0.0874), "auroc": (0.6019, 0.1312)},
    },
}
