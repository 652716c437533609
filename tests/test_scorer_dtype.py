"""Scorers in float16 / bfloat16 (``spo eval --scorer-dtype``, ``preference.dtype``): the networks
run in 16 bits, embeddings are normalised and scores computed in fp32, the metric is named apart
(``pickscore@bfloat16``), and on the tiny models the scores stay within a stated distance of fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spo.evaluation.scorers import ScorerSpec
from spo.preference.clip_scorer import normalized
from test_scorers_clip_family import _mlp_state_dict

PROMPTS = ["a red circle", "a blue square", "two green stars", "a yellow cat", "x", "a dog on a long walk home"]
#: largest |score - fp32 score| allowed on the tiny models (PickScore's scale: 100 x cosine),
#: and for the aesthetic MLP's output
TOLERANCE = {torch.float16: 0.05, torch.bfloat16: 0.25}


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(len(PROMPTS), 3, 48, 40, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_scorers_stay_near_float32(tiny_clip_path: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    save_file(_mlp_state_dict(), str(tmp_path / "mlp.safetensors"))
    images = _images()
    for spec, name in ((f"pickscore={tiny_clip_path}", "pickscore"),
                       (f"aesthetic={tmp_path / 'mlp.safetensors'},clip={tiny_clip_path}", "aesthetic")):
        exact = ScorerSpec.parse(spec).load()
        low = ScorerSpec.parse(spec).load(dtype=dtype)
        precision = str(dtype).removeprefix("torch.")
        assert exact.name == name and low.name == f"{name}@{precision}" and precision in low.label
        assert type(low).name == name  # the class's registry name is untouched
        got, want = low.score(images, PROMPTS), exact.score(images, PROMPTS)
        assert got.dtype == torch.float32
        assert float((got - want).abs().max()) <= TOLERANCE[dtype], (name, dtype, got, want)
        assert not torch.equal(got, want)  # the networks really ran in 16 bits


def test_embeddings_are_normalised_in_float32() -> None:
    """A 16-bit embedding whose sum of squares overflows float16 (> 65504) still gives unit rows."""
    emb = torch.full((2, 1024), 300.0, dtype=torch.float16)
    assert torch.isinf((emb * emb).sum(dim=-1)).all()  # what a float16 norm would meet
    unit = normalized(emb)
    assert unit.dtype == torch.float32 and torch.allclose(unit.norm(dim=-1), torch.ones(2))
