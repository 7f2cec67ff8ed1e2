"""Profiles are data (core/profile_configs/*.toml): every file loads, its machine-dependent parts are
read when a profile is read, a bad file is an error naming the file and the key, and the seeded
checkpoints' digests stay what they were when profiles were Python (no rebuild, no re-export)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mofserve.core import seeded
from mofserve.core.profiles import (
    PAPER_SHAPED_LLM_LAYERS_ENV,
    PROFILE_DIR,
    PROFILE_NAMES,
    Profile,
    get_profile,
    load_profile,
    profile_environment,
)
from mofserve.server.config import from_environment

# _spec_digest of each seeded profile as the Python factories built it (paper-shaped at its default
# depth): a change here rebuilds every seeded checkpoint and re-exports every graph cached from it
DIGESTS = {"tiny": "6447a08cffc08c4c", "small": "6654cb3d9ad63950", "paper-shaped": "81a0ea897037d66d"}


@pytest.fixture
def environ(monkeypatch, tmp_path):
    """No profile variable set, MOFSERVE_HOME in tmp_path."""
    for name in profile_environment():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path / "home"))
    return monkeypatch


def test_every_file_is_a_profile_and_seeded_digests_are_unchanged(environ):
    assert set(PROFILE_NAMES) == {p.stem for p in PROFILE_DIR.glob("*.toml")} >= {"tiny", "small", "paper"}
    for name in PROFILE_NAMES:
        profile = get_profile(name)
        assert isinstance(profile, Profile) and profile.name == name and profile.description
        if profile.seeded is not None:
            assert seeded._spec_digest(profile) == DIGESTS[name], name
    assert {n for n in PROFILE_NAMES if get_profile(n).random_weights} == set(DIGESTS)


def test_seeded_sources_follow_mofserve_home_when_the_profile_is_read(environ, tmp_path):
    first = get_profile("tiny")
    assert first.sources.llava == str(tmp_path / "home" / "checkpoints" / "tiny" / "llava")
    assert get_profile("tiny") is first  # read per request: built once for the same inputs
    environ.setenv("MOFSERVE_HOME", str(tmp_path / "elsewhere"))
    assert get_profile("tiny").sources.clip == str(tmp_path / "elsewhere" / "checkpoints" / "tiny" / "clip")
    assert get_profile("paper-shaped").sources.dinov2.endswith("paper-shaped-llm2/dinov2")


def test_paper_sources_come_from_the_environment_then_the_settings(environ):
    default = get_profile("paper").sources
    assert (default.clip, default.dinov2, default.llava) == (
        "openai/clip-vit-large-patch14-336", "facebook/dinov2-large", "MMVP/MoF_Models")
    environ.setenv("MOFSERVE_CLIP", "/models/clip")
    environ.setenv("MOFSERVE_LLAVA", "  ")  # blank: the default
    sources = get_profile("paper").with_sources(dinov2="/flag/dinov2", llava=None).sources
    assert (sources.clip, sources.dinov2, sources.llava) == ("/models/clip", "/flag/dinov2", "MMVP/MoF_Models")
    # the serve settings leave a profile's variables to it (their clip/dinov2/llava override it later)
    assert from_environment({"MOFSERVE_CLIP": "x", PAPER_SHAPED_LLM_LAYERS_ENV: "3", "MOFSERVE_PROFILE": "paper"}) \
        == {"profile": "paper"}


def test_paper_shaped_depth_reaches_the_spec_the_folder_and_the_description(environ):
    environ.setenv(PAPER_SHAPED_LLM_LAYERS_ENV, " 5 ")
    profile = get_profile("paper-shaped")
    assert profile.seeded.llm.num_layers == 5 and isinstance(profile.seeded.llm.num_layers, int)
    assert "paper-shaped-llm5" in profile.sources.llava and "with 5 of its 32 layers" in profile.description


def _write(folder: Path, text: str, name: str = "mine") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


PLAIN = ('image_size = 224\npatch_size = 14\ndefault_alpha = 0.5\n'
         '[sources]\nclip = "/c"\ndinov2 = "/d"\nllava = "/l"\n')


def test_a_file_anywhere_is_a_profile_named_by_the_file(tmp_path):
    profile = load_profile(_write(tmp_path, PLAIN + "[serving]\npreferred_batch_sizes = [2]\nmax_batch_size = 2\n"))
    assert (profile.name, profile.sources.llava, profile.random_weights) == ("mine", "/l", False)
    assert profile.serving.preferred_batch_sizes == (2,) and profile.serving.runtime == "openvino"  # a default


@pytest.mark.parametrize(("text", "message"), [
    (PLAIN + "[serving]\nruntim = 'onnxruntime'\n", r"serving\.runtim: unknown key; expected one of max_batch_size"),
    (PLAIN.replace("224", '"224"'), r"image_size: expected an integer, got '224' \(str\)"),
    (PLAIN.replace("0.5", "true"), r"default_alpha: expected a number, got True"),
    (PLAIN + "[serving]\npreferred_batch_sizes = [4, 8.0]\n", r"serving\.preferred_batch_sizes\[1\]: expected an"),
    (PLAIN.replace('llava = "/l"\n', ""), r"sources\.llava: missing \(required\)"),
    (PLAIN.replace('"/c"', '"${clip}"'), r"sources\.clip: unknown variable 'clip'"),
    ('name = "other"\n' + PLAIN, r"name: a profile is named by its file \('mine'\)"),
    ("image_size = 224\npatch_size = 14\ndefault_alpha = 0.5\n", r"sources: missing"),
    (PLAIN.replace("[sources]", "[sources]\nfolder = 'x'"), r"sources: folder is where a \[seeded\] profile"),
    (PLAIN + "[seeded]\nseed = 0\n[seeded.clip]\nhidden_size = 1\n", r"seeded\.dino: missing \(required\)"),
    (PLAIN + "[variables.n]\nenv = 'X'\ndefault = 'a'\nmax = 3\n", r"variables\.n: min and max bound an integer"),
    ("image_size = 3\n" + PLAIN, r"not valid TOML"),
    (PLAIN + "[serving]\nllm_prefill_chunk = -1\n", r"serving\.llm_prefill_chunk: must be 0 \(whole prompts\)"),
    (PLAIN + "[serving]\nllm_max_sequences = 0\n", r"serving\.llm_max_sequences: must be at least 1, got 0"),
])
def test_a_bad_file_is_an_error_naming_the_file_and_the_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as raised:
        load_profile(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_an_integer_variable_is_checked_against_its_bounds(tmp_path):
    path = _write(tmp_path, PLAIN.replace("224", '"${size}"') +
                  "[variables.size]\nenv = 'MINE_SIZE'\ndefault = 224\nmin = 14\nhelp = 'pixels'\n")
    assert load_profile(path, environ={}).image_size == 224
    assert load_profile(path, environ={"MINE_SIZE": "336"}).image_size == 336
    with pytest.raises(ValueError, match=r"MINE_SIZE: expected an integer within \[14, inf\] \(pixels\), got '7'"):
        load_profile(path, environ={"MINE_SIZE": "7"})


def test_an_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match=r"profile: unknown profile 'huge'; expected one of .*tiny"):
        get_profile("huge")
