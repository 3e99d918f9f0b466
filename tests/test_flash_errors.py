"""Every bad input to flash_attention and softmax raises a clear Python error naming the problem."""
import pytest
import torch

import attnpkg
from attnpkg import attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def t(*shape, dtype=torch.float16, device=DEVICE):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


GOOD = dict(q=(2, 4, 8, 16), k=(2, 4, 8, 16), v=(2, 4, 8, 16))

BAD_SHAPES = [
    ("rank", dict(q=(4, 8, 16)), ValueError, r"q must have 4 dimensions.*\(4, 8, 16\)"),
    ("rank v", dict(v=(1, 2, 4, 8, 16)), ValueError, r"v must have 4 dimensions"),
    ("batch", dict(k=(3, 4, 8, 16), v=(3, 4, 8, 16)), ValueError, r"batch sizes differ"),
    ("head_dim", dict(k=(2, 4, 8, 32), v=(2, 4, 8, 32)), ValueError, r"head_dim must be the same.*16, 32, 32"),
    ("head_dim v", dict(v=(2, 4, 8, 8)), ValueError, r"head_dim must be the same"),
    ("groups", dict(k=(2, 3, 8, 16), v=(2, 3, 8, 16)), ValueError, r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
    ("kv length", dict(v=(2, 4, 9, 16)), ValueError, r"k and v must have the same heads and length"),
    ("kv heads", dict(k=(2, 2, 8, 16)), ValueError, r"k and v must have the same heads and length"),
    ("too wide", dict(q=(1, 1, 4, 320), k=(1, 1, 4, 320), v=(1, 1, 4, 320)), ValueError, r"head_dim must be between 1 and 256, got 320"),
]


@pytest.mark.parametrize("name,changes,error,match", BAD_SHAPES, ids=[c[0] for c in BAD_SHAPES])
def test_bad_shapes(name, changes, error, match):
    shapes = {**GOOD, **changes}
    with pytest.raises(error, match=match):
        attnpkg.flash_attention(*(t(*shapes[n]) for n in "qkv"))


def test_mixed_dtypes():
    with pytest.raises(TypeError, match=r"share one dtype.*float16.*float32"):
        attnpkg.flash_attention(t(1, 1, 4, 16), t(1, 1, 4, 16, dtype=torch.float32), t(1, 1, 4, 16))


def test_float64_points_to_reference():
    x = t(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"float64.*attnpkg.reference.attention"):
        attnpkg.flash_attention(x, x, x)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn])
def test_unsupported_dtypes(dtype):
    x = t(1, 1, 4, 16).to(dtype)
    with pytest.raises(TypeError, match=r"not supported"):
        attnpkg.flash_attention(x, x, x)


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor, got list"):
        attnpkg.flash_attention([[1.0]], t(1, 1, 4, 16), t(1, 1, 4, 16))


def test_different_devices():
    x = t(1, 1, 4, 16)
    with pytest.raises(ValueError, match=r"one device"):
        attnpkg.flash_attention(x, x.to("meta"), x)


def test_bad_scale():
    x = t(1, 1, 4, 16)
    for bad in (float("nan"), float("inf"), 0.0, -0.5):
        with pytest.raises(ValueError, match=r"scale must be a positive finite number"):
            attnpkg.flash_attention(x, x, x, scale=bad)


def test_bf16_on_an_old_gpu_is_refused(monkeypatch):
    if DEVICE != "cuda":
        pytest.skip("the capability check runs on CUDA tensors")
    monkeypatch.setattr(attention, "_capability", lambda device: (7, 5))
    x = t(1, 1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"bfloat16 needs a GPU of compute capability 8.0.*7.5.*float16"):
        attnpkg.flash_attention(x, x, x)


def test_cpu_tensors_when_the_interpreter_is_off(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = t(1, 1, 4, 16, device="cpu")
    with pytest.raises(ValueError, match=r"interpreter"):
        attnpkg.flash_attention(x, x, x)
    with pytest.raises(ValueError, match=r"interpreter"):
        attnpkg.softmax(x)


def test_softmax_bad_inputs():
    with pytest.raises(TypeError, match=r"float64.*torch.softmax"):
        attnpkg.softmax(t(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"at least one dimension"):
        attnpkg.softmax(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        attnpkg.softmax([1.0, 2.0])


def test_no_compiler_error_reaches_the_user():
    """The checks run before any kernel: a bad call never gets as far as Triton."""
    assert attention._check_inputs is not None
    with pytest.raises((ValueError, TypeError)) as info:
        attnpkg.flash_attention(t(2, 4, 8, 16), t(2, 4, 9, 16), t(2, 4, 8, 16))
    assert "flash_attention:" in str(info.value)
