import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mofserve.core.checkpoints import (
    CheckpointNotFoundError,
    iter_tensors,
    load_clip_vision,
    load_dinov2,
    load_projectors,
    read_shapes,
    resolve_source,
)
from mofserve.core.profiles import get_profile
from mofserve.core.seeded import MARKER, ensure_seeded_checkpoints


def test_tiny_profile_loads_back_through_the_real_checkpoint_loaders(tiny_profile, tiny_paths):
    shapes = read_shapes(tiny_paths, tiny_profile)
    assert shapes.num_patches == (224 // 14) ** 2 == 256
    clip = load_clip_vision(tiny_paths.clip)
    dino = load_dinov2(tiny_paths.dinov2)
    assert type(clip).__name__ == "CLIPVisionModelWithProjection"
    assert type(dino).__name__ == "Dinov2Model"
    assert clip.config.hidden_size == shapes.clip_width
    projectors = load_projectors(tiny_paths.llava)
    assert set(projectors) == {"clip", "dinov2"}
    assert projectors["clip"][0].in_features == shapes.clip_width
    assert projectors["dinov2"][2].out_features == shapes.llm_width


def test_llava_checkpoint_is_in_llava_format(tiny_paths):
    config = json.loads((tiny_paths.llava / "config.json").read_text())
    assert config["model_type"] == "llava" and config["mm_projector_type"] == "mlp2x_gelu"
    keys = set(load_file(str(tiny_paths.llava / "model.safetensors")))
    assert "model.mm_projector.0.weight" in keys and "model.dino_mm_projector.2.bias" in keys
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys


def test_projector_prefixes_do_not_catch_each_others_keys(tiny_paths):
    clip_keys = [k for k, _ in iter_tensors(tiny_paths.llava, ["model.mm_projector."])]
    assert clip_keys and all("dino" not in k for k in clip_keys)


def test_seeded_build_is_reused_when_the_spec_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path))
    profile = get_profile("tiny")
    ensure_seeded_checkpoints(profile)
    weights = tmp_path / "checkpoints" / "tiny" / "llava" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    ensure_seeded_checkpoints(profile)
    assert weights.stat().st_mtime_ns == first
    assert (tmp_path / "checkpoints" / "tiny" / "clip" / MARKER).is_file()


def test_seeded_build_is_deterministic(tmp_path, monkeypatch, tiny_paths):
    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path))
    ensure_seeded_checkpoints(get_profile("tiny"))
    a = load_file(str(tmp_path / "checkpoints" / "tiny" / "llava" / "model.safetensors"))
    b = load_file(str(tiny_paths.llava / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in ("model.mm_projector.0.weight", "lm_head.weight"))


def _copy_llava(tiny_paths, dst):
    shutil.copytree(tiny_paths.llava, dst)
    return load_file(str(dst / "model.safetensors"))


def test_sharded_safetensors_checkpoint_loads_projectors(tiny_paths, tmp_path):
    dst = tmp_path / "llava"
    state = _copy_llava(tiny_paths, dst)
    (dst / "model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(dst / name))
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    projectors = load_projectors(dst)
    torch.testing.assert_close(projectors["dinov2"][0].weight, state["model.dino_mm_projector.0.weight"])


def test_pytorch_bin_checkpoint_loads_with_weights_only(tiny_paths, tmp_path):
    dst = tmp_path / "llava"
    state = _copy_llava(tiny_paths, dst)
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    projectors = load_projectors(dst)
    torch.testing.assert_close(projectors["clip"][2].bias, state["model.mm_projector.2.bias"])


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_bin_checkpoint_with_arbitrary_pickle_is_refused(tiny_paths, tmp_path):
    dst = tmp_path / "llava"
    _copy_llava(tiny_paths, dst)
    (dst / "model.safetensors").unlink()
    with (dst / "pytorch_model.bin").open("wb") as f:
        torch.save({"model.mm_projector.0.weight": _Payload()}, f, pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        load_projectors(dst)


def test_checkpoint_without_dino_projector_says_which_checkpoint_is_needed(tiny_paths, tmp_path):
    dst = tmp_path / "llava"
    state = _copy_llava(tiny_paths, dst)
    save_file({k: v for k, v in state.items() if "dino" not in k}, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match=r"dino_mm_projector.*I-MoF"):
        load_projectors(dst)


def test_hub_id_resolves_from_the_hf_cache(tiny_paths, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--openai--clip-vit-large-patch14-336" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_paths.clip, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    import huggingface_hub._snapshot_download as sd

    monkeypatch.setattr(sd.constants, "HF_HUB_CACHE", str(cache))
    resolved = resolve_source("openai/clip-vit-large-patch14-336", "clip")
    assert resolved == snapshot
    assert load_clip_vision(resolved).config.hidden_size == 32


def test_missing_checkpoint_names_the_flag_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match=r"dinov2: checkpoint 'facebook/nope'.*--dinov2 PATH"):
        resolve_source("facebook/nope", "dinov2")
    with pytest.raises(CheckpointNotFoundError, match="--llava PATH"):
        resolve_source(str(tmp_path / "absent"), "llava")
