"""HPSv2.1: HPSv2's architecture, preprocessing and score (100 * cosine) with the v2.1 weights
(``HPS_v2.1_compressed.pt`` of hub ``xswu/HPSv2``). Its scores are not comparable with HPSv2's."""

from __future__ import annotations

from .hpsv2 import HUB_REPO, HPSv2Scorer


class HPSv21Scorer(HPSv2Scorer):
    name = "hpsv21"
    label = "HPSv2.1"
    hub_filename = "HPS_v2.1_compressed.pt"
    expected_range = ("100 x cosine (no logit scale), about 20-33; HPSv2 README benchmark: SD1.4 25.35; SPO "
                      "paper (HPS version not stated): SD-1.5 23.79-26.45, SDXL 26.95-31.80; not comparable "
                      "with HPSv2")
    weights_help = ("HPS_v2.1_compressed.pt (a torch checkpoint of tensors, {'state_dict': ...}, or "
                    f"safetensors), a directory holding it, the hub id {HUB_REPO}, or REPO_ID/FILE of a hub repo")


SCORER = HPSv21Scorer
