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
    """A 16-bit embedding whose norm overflows float16 (> 65504) still gives unit rows."""
    emb = torch.full((2, 1024), 3000.0, dtype=torch.float16)
    assert torch.isinf(emb.norm(dim=-1)).all()  # what a float16 norm gives: rows of zeros
    unit = normalized(emb)
    assert unit.dtype == torch.float32 and torch.allclose(unit.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_logit_scale_stays_float32(tiny_clip_path: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    """PickScore's exp(logit_scale) is 100 (ln 100 saved): in bfloat16 it would round to 98.9."""
    import math

    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_path)
    model.logit_scale.data.fill_(math.log(100.0))
    model.save_pretrained(tmp_path / "clip")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_clip_path / name).exists():
            (tmp_path / "clip" / name).write_bytes((tiny_clip_path / name).read_bytes())
    scorer = ScorerSpec.parse(f"pickscore={tmp_path / 'clip'}").load(dtype=dtype)
    assert scorer.clip.model.dtype == dtype
    images = _images()
    with torch.no_grad():
        assert float(scorer.clip._logit_scale().exp()) == pytest.approx(100.0, rel=1e-6)
        cosines = (scorer.clip.image_embeddings(images) * scorer.clip.text_embeddings(PROMPTS)).sum(dim=-1)
    # the score is 100 x cosine, not exp(the held 16-bit scale) x cosine (bfloat16: 98.9 x)
    # (16-bit CPU kernels round a little differently from call to call: 2e-3, far below 1.1%)
    torch.testing.assert_close(scorer.score(images, PROMPTS), 100 * cosines.cpu(), rtol=2e-3, atol=1e-3)
    held = float(scorer.clip.model.logit_scale.float().exp())
    assert dtype == torch.float16 or abs(held - 100) > 1  # what the held bfloat16 scale would have given
