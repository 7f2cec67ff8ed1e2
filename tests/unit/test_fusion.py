import math

import numpy as np
import pytest
import torch

from mofserve.core.fusion import Fuser, Projector, check_alpha
from mofserve.core.tensors import FusionMode, token_count
from tests.reference import fuse as reference_fuse

P, D, H = 9, 8, 6


def _state(projector: Projector) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in projector.state_dict().items()}


@pytest.fixture
def parts():
    torch.manual_seed(0)
    clip_p, dino_p, add_p = Projector(D, H), Projector(D, H), Projector(D, H)
    rng = np.random.default_rng(0)
    clip = rng.standard_normal((2, P, D)).astype(np.float32)
    dino = rng.standard_normal((2, P, D)).astype(np.float32)
    return clip_p, dino_p, add_p, clip, dino


@pytest.mark.parametrize("mode", [m.value for m in FusionMode])
def test_each_mode_matches_the_papers_formula(parts, mode):
    clip_p, dino_p, _, clip, dino = parts
    fuser = Fuser(clip_p, dino_p)
    got = fuser(mode, torch.from_numpy(clip), torch.from_numpy(dino), torch.tensor([0.3, 0.8])).numpy()
    assert got.shape == (2, token_count(mode, P), H)
    for i, alpha in enumerate((0.3, 0.8)):
        want = reference_fuse(mode, clip[i], dino[i], _state(clip_p), _state(dino_p), alpha)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_interleaved_tokens_alternate_clip_then_dino(parts):
    clip_p, dino_p, _, clip, dino = parts
    fuser = Fuser(clip_p, dino_p)
    c, d = torch.from_numpy(clip), torch.from_numpy(dino)
    out = fuser("interleaved", c, d)
    assert out.shape == (2, 2 * P, H)
    torch.testing.assert_close(out[:, 0::2], fuser("clip", c, d))
    torch.testing.assert_close(out[:, 1::2], fuser("dinov2", c, d))


def test_additive_mixes_before_the_projector_with_its_own_projector_when_given(parts):
    clip_p, dino_p, add_p, clip, dino = parts
    fuser = Fuser(clip_p, dino_p, add_p)
    c, d = torch.from_numpy(clip), torch.from_numpy(dino)
    torch.testing.assert_close(fuser("additive", c, d, 0.0), add_p(c))
    torch.testing.assert_close(fuser("additive", c, d, 1.0), add_p(d))
    mixed = fuser("additive", c, d, 0.25).detach().numpy()
    want = reference_fuse("additive", clip[0], dino[0], _state(clip_p), _state(dino_p), 0.25, _state(add_p))
    np.testing.assert_allclose(mixed[0], want, rtol=1e-5, atol=1e-5)
    # mixing after the projector would differ: the projector is not linear
    after = (0.75 * add_p(c) + 0.25 * add_p(d)).detach().numpy()
    assert not np.allclose(mixed, after, atol=1e-4)


def test_additive_without_its_own_projector_uses_the_clip_projector(parts):
    clip_p, dino_p, _, clip, dino = parts
    fuser = Fuser(clip_p, dino_p)
    c = torch.from_numpy(clip)
    torch.testing.assert_close(fuser("additive", c, torch.from_numpy(dino), 0.0), clip_p(c))


@pytest.mark.parametrize("alpha", [-0.01, 1.0001, math.nan, math.inf])
def test_alpha_outside_unit_interval_is_rejected_naming_the_field(alpha):
    with pytest.raises(ValueError, match=r"alpha: must be within \[0, 1\]"):
        check_alpha(alpha)


def test_unknown_mode_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"mode: unknown fusion mode 'concat'.*interleaved"):
        FusionMode.parse("concat")


def test_projector_loads_llava_state_dict_keys(parts):
    clip_p = parts[0]
    loaded = Projector.from_state_dict(clip_p.state_dict())
    assert set(clip_p.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    x = torch.randn(3, D)
    torch.testing.assert_close(loaded(x), clip_p(x))
