"""benchmarks/fullsize.py --tiny: every model x variant runs through SPOTrainer on the CPU with
tiny models, and the JSON holds the component profile, per-round seconds, work, floors and ratios
(the full-size numbers come from the same script on a GPU)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks"
MODELS = ("sd15", "sdxl")
VARIANTS = ("baseline", "chunked", "checkpointing", "tiny_decoder", "all", "lowmem", "lowmem_all", "lowmem_tiled")
SWITCH_KEYS = {"baseline": [], "chunked": ["sampling.decode_batch_size"], "checkpointing": ["model.gradient_checkpointing"],
               "tiny_decoder": ["preference.decoder"],
               "all": ["sampling.decode_batch_size", "model.gradient_checkpointing", "preference.decoder"],
               "lowmem": [], "lowmem_all": ["sampling.batch_size", "preference.dtype"],
               "lowmem_tiled": ["sampling.decode_tile"]}
LOWMEM = ("lowmem", "lowmem_all", "lowmem_tiled")
PROFILE = ("unet_plain_pass", "unet_pool_pass", "decode_full", "decode_chunked", "tiny_decode_full",
           "tiny_decode_chunked", "score_full", "score_chunked", "train_micro_batch", "train_micro_batch_checkpointing")


def _known(key: str) -> bool:
    from spo.config.schema import SPOConfig

    section, _, name = key.partition(".")
    return name in {f.name for f in dataclasses.fields(getattr(SPOConfig(), section))}


def test_fullsize_tiny(tmp_path: Path) -> None:
    out = tmp_path / "fullsize.json"
    done = subprocess.run([sys.executable, "fullsize.py", "--tiny", "--output", str(out)], cwd=BENCH,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["torch"] and result["diffusers"]
    assert set(result["models"]) == set(MODELS)
    for model in MODELS:
        entry = result["models"][model]
        profile = entry["profile"]
        for key in PROFILE:
            assert profile[key]["seconds"] > 0, (model, key)
        assert profile["unet_pool_pass"]["unet_rows"] == 2 * entry["prompts"] * entry["k"]  # CFG doubles the rows
        assert all(v > 0 for v in profile["ratios"].values())
        assert profile["parameters"]["unet"] > 0 and profile["parameters"]["tiny_decoder"] > 0
        expected = set(VARIANTS) if model == "sd15" else set(VARIANTS) - {"lowmem_tiled"}
        assert set(entry["variants"]) == expected
        base = entry["variants"]["baseline"]
        assert base["status"] == "ok" and base["ratio_to_baseline"]["round"] == 1.0
        for variant in sorted(expected):
            record = entry["variants"][variant]
            missing = [k for k in SWITCH_KEYS[variant] if not _known(k)]
            if missing:  # a switch this checkout does not have yet: skipped, with a note naming it
                assert record["status"] == "skipped" and missing[0] in record["note"]
                continue
            assert record["status"] == "ok", (model, variant, record.get("error"), record.get("traceback"))
            for key in ("sampling_seconds", "training_seconds", "round_seconds"):
                assert record[key] > 0, (model, variant, key)
            assert record["ratio_to_baseline"]["round"] > 0
            assert all(record["ratio_to_floor"][p] > 0 for p in ("sampling", "training", "round"))
            (first,) = record["rounds"]
            assert first["valid_records"] > 0 and first["optimizer_steps"] > 0
            assert first["floor"]["round_seconds"] > 0 and first["ratio_to_floor"]["round"] > 0
            work = first["work"]
            assert work["unet_rows"] > 0 and work["decoded"] == work["scored"] > 0
            # the levers change how the work is done, not how much of it there is
            assert work["decoded"] == base["rounds"][0]["work"]["decoded"]
            assert work["unet_calls"] == base["rounds"][0]["work"]["unet_calls"]
            settings = record["settings"]
            assert settings["tiny_decoder"] == (variant in ("tiny_decoder", "all"))
            assert settings["gradient_checkpointing"] == (variant in ("checkpointing", "all", *LOWMEM))
            # the one switch: its levers on, and only in its variants (pinned off elsewhere)
            assert settings["offload_text_encoders"] == settings["preference_offload"] == (variant in LOWMEM)
            assert settings["sampling_batch_size"] == (8 if variant == "lowmem_all" else None)
            assert settings["preference_dtype"] == ("float16" if variant == "lowmem_all" else "float32")
            assert settings["decode_tile"] == (16 if variant == "lowmem_tiled" else None)
            if variant in LOWMEM:
                assert settings["decode_batch_size"] == 1
            elif variant in ("chunked", "all"):
                assert settings["decode_batch_size"] == entry["decode_chunk"]
            elif _known("sampling.decode_batch_size"):
                assert settings["decode_batch_size"] is None  # the baseline decodes a step at once


def test_fullsize_tiny_sd3_with_and_without_t5(tmp_path: Path) -> None:
    """``--models sd3``: the SD3.5-medium architecture (dual attention, RMS q/k norm, 16 latent
    channels) with a T5 encoder, cut down, through the trainer; ``no_t5`` loads the same
    components without T5; ``lowmem`` runs the suffix's levers."""
    out = tmp_path / "fullsize-sd3.json"
    done = subprocess.run([sys.executable, "fullsize.py", "--tiny", "--models", "sd3", "--output", str(out)], cwd=BENCH,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    entry = json.loads(out.read_text())["models"]["sd3"]
    assert entry["profile"]["parameters"]["text_encoder_3"] > 0  # T5 is in the pipeline
    assert "tiny_decode_full" not in entry["profile"]  # TAESD's 4 channels do not decode SD3's 16
    variants = entry["variants"]
    assert set(variants) == {"baseline", "default", "no_t5", "lowmem"}
    for name, record in variants.items():
        assert record["status"] == "ok", (name, record.get("error"), record.get("traceback"))
        assert record["rounds"][0]["valid_records"] > 0
    assert variants["default"]["settings"]["text_encoders"] == 3
    assert variants["no_t5"]["settings"]["text_encoders"] == 2
    assert variants["lowmem"]["settings"]["offload_text_encoders"] and variants["lowmem"]["settings"]["preference_offload"]
    # where the SPM sits as each phase starts and during the rollout (on a GPU: cpu, cuda:0, cpu)
    assert variants["lowmem"]["rounds"][0]["scorer_device"] == {"sampling": "cpu", "rollout": "cpu", "training": "cpu"}


def test_tables_render_the_measured_json() -> None:
    """benchmarks/tables.py on the committed H200 result: the device named, the docs' numbers."""
    done = subprocess.run([sys.executable, "tables.py", "results/fullsize.json", "results/eval-cost.json"], cwd=BENCH,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on NVIDIA H200" in done.stdout
    assert "| sd15 | baseline | 21.4 (16.3 + 5.1) | 1.00 (baseline) | 39.43 / 26.12 |" in done.stdout
    assert "| sdxl | all | 25.3 (5.3 + 20.0) | 1.20 (baseline) | 11.08 / 15.70 |" in done.stdout
    assert "| pickscore | fp16 |" in done.stdout
    bad = subprocess.run([sys.executable, "tables.py", "nonexistent.json"], cwd=BENCH, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and bad.stderr.startswith("error:")
