"""The batched torch oracles agree with the numpy reference (spo.toy.oracles) image by image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spo.toy import DEGRADATIONS, aesthetic, aesthetic_defects, alignment, all_scenes, degrade, misalign, render
from spo.toy.batched_oracles import aesthetic_batch, aesthetic_defects_batch, alignment_batch, to_oracle_images
from spo.toy.grammar import COLOURS
from spo.toy.render import from_tensor_range

SCENES = all_scenes()


@pytest.fixture(scope="module")
def controlled() -> tuple[list[np.ndarray], list]:
    """Every scene clean, then degraded (each kind at a weak and a strong strength, blur also at
    the strength whose edges sit exactly on the 0.5 coverage threshold), and with changed prompts."""
    rng = np.random.default_rng(0)
    clean = [render(s, rng) for s in SCENES]
    images, prompts = list(clean), list(SCENES)
    for kind in DEGRADATIONS:
        for strength in (0.2, 1.0):
            images += [degrade(x, kind, strength, rng, np.array(COLOURS[s.colour]) / 255) for x, s in zip(clean[::2], SCENES[::2])]
            prompts += SCENES[::2]
    images += clean[:60]
    prompts += [misalign(s, rng) for s in SCENES[:60]]
    return images, prompts


def test_aesthetic_matches_reference(controlled: tuple[list[np.ndarray], list]) -> None:
    images, _ = controlled
    reference = np.array([aesthetic(x) for x in images])
    batched = aesthetic_batch(torch.from_numpy(np.stack(images))).numpy()
    assert np.abs(batched - reference).max() <= 1e-6
    assert reference.min() < 0.2 and reference.max() > 0.99  # the set spans the scale
    one = aesthetic_defects_batch(torch.from_numpy(images[-1][None]))
    for name, value in aesthetic_defects(images[-1]).items():
        assert float(one[name][0]) == pytest.approx(value, abs=1e-7)


def test_alignment_matches_reference(controlled: tuple[list[np.ndarray], list]) -> None:
    images, prompts = controlled
    reference = np.array([alignment(x, p) for x, p in zip(images, prompts)])
    batched = alignment_batch(torch.from_numpy(np.stack(images)), prompts).numpy()
    assert np.array_equal(batched, reference)
    assert len(set(reference.tolist())) >= 4  # not a trivially constant set
    # string prompts and Scene objects read the same
    assert np.array_equal(alignment_batch(torch.from_numpy(np.stack(images[:5])), [s.prompt for s in prompts[:5]]).numpy(),
                          reference[:5])


def test_model_samples_match_reference() -> None:
    from spo.builtin import resolve_weights
    from spo.sampling import ddim_sample
    from spo.toy.model import ToyBackbone

    backbone = ToyBackbone.from_pretrained(resolve_weights("toy:base"), device="cpu")
    prompts = [s.prompt for s in SCENES[::27]]
    latents = ddim_sample(backbone, prompts, num_inference_steps=10, eta=1.0, guidance_scale=3.0,
                          generator=torch.Generator().manual_seed(0))
    images = backbone.decode(latents)
    pictures = to_oracle_images(images)
    for x, picture in zip(images, pictures):  # the conversion is the reference's
        assert np.array_equal(picture.numpy(), from_tensor_range(x.numpy()))
    reference_ae = np.array([aesthetic(p) for p in pictures.numpy()])
    reference_al = np.array([alignment(p, q) for p, q in zip(pictures.numpy(), prompts)])
    assert np.abs(aesthetic_batch(pictures).numpy() - reference_ae).max() <= 1e-6
    assert np.array_equal(alignment_batch(pictures, prompts).numpy(), reference_al)


def test_edge_cases() -> None:
    flat = np.full((2, 32, 32, 3), 0.5, dtype=np.float32)  # nothing stands out: no object, no defect
    flat[1] = np.random.default_rng(0).uniform(0, 1, (32, 32, 3))  # pure noise
    prompts = [SCENES[0], SCENES[1]]
    assert np.abs(aesthetic_batch(torch.from_numpy(flat)).numpy() - [aesthetic(x) for x in flat]).max() <= 1e-6
    assert alignment_batch(torch.from_numpy(flat), prompts).tolist() == [alignment(x, p) for x, p in zip(flat, prompts)]
    with pytest.raises(ValueError, match="images but"):
        alignment_batch(torch.from_numpy(flat), prompts[:1])
    with pytest.raises(ValueError, match="B, H, W, 3"):
        aesthetic_batch(torch.zeros(2, 3, 32, 32))


def test_shared_arithmetic_is_bit_identical() -> None:
    """The pieces whose rounding decides threshold pixels agree bit for bit on random data, with no
    BLAS (its float32 kernels round differently per CPU), no np.percentile (numpy < 2.4 placed a
    float32 array's percentile in float32) and no torch.sqrt (one ulp low for some float32 inputs)."""
    from spo.toy import batched_oracles as B
    from spo.toy import oracles as O

    rng = np.random.default_rng(0)
    d = (rng.random((4, 32, 32, 3), dtype=np.float32) - 0.5) * 2
    axis = (rng.random((64, 3), dtype=np.float32) - 0.5) * 2
    td, taxis = torch.from_numpy(d), torch.from_numpy(axis)
    squares = d * d
    ordered = (squares[..., 0] + squares[..., 1]) + squares[..., 2]
    correctly_rounded = np.sqrt(ordered.astype(np.float64)).astype(np.float32)
    assert np.array_equal(O._norm3(d), correctly_rounded)
    assert np.array_equal(B._norm3(td).numpy(), correctly_rounded)
    assert np.array_equal(B._dot3(td, taxis[0]).numpy(), O._dot3(d, axis[0]))
    assert B._squared_length(taxis).tolist() == [O._squared_length(a) for a in axis]
    values = d.reshape(4, -1)
    assert B._percentile(torch.from_numpy(values), 98).tolist() == [O._percentile(v, 98) for v in values]
    assert np.allclose([O._percentile(v, 98) for v in values], np.percentile(values.astype(np.float64), 98, axis=1),
                       rtol=0, atol=1e-15)
