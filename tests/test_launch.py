"""attnpkg.launch: the key that decides when a compiled kernel may be called directly.

The direct call itself needs a GPU (tests/test_gpu.py); the key is plain Python."""
import pytest
import torch

from attnpkg import launch as launch_module
from attnpkg.launch import _key, specialization


def spec(*args):
    return specialization(args)


def test_tensors_are_keyed_by_dtype_and_alignment_not_by_address_or_shape():
    a = torch.randn(64, 16)
    b = torch.randn(8, 8)                                # another address and shape: same specialization
    assert spec(a) == spec(b)
    assert spec(a) != spec(a.half())
    buffer = torch.randn(1025)
    assert buffer.data_ptr() % 16 == 0
    assert spec(buffer[1:]) != spec(buffer[:-1])         # 4 bytes past a 16-byte boundary


def test_scalars_are_keyed_by_value_and_type():
    assert spec(16) != spec(32) and spec(1) != spec(2)
    assert len({spec(True), spec(1), spec(1.0)}) == 3    # equal in Python, specialized differently by Triton
    assert spec(0.5) != spec(0.25)


def test_unknown_arguments_are_never_taken_directly():
    assert launch_module._UNCACHED in spec(object())


def test_tensor_descriptors_are_keyed_by_base_shape_strides_and_block():
    TensorDescriptor = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    x = torch.randn(4, 128, 64)
    flat = x.view(-1, 64)
    d = TensorDescriptor(flat, shape=[512, 64], strides=[64, 1], block_shape=[64, 64])
    same = TensorDescriptor(torch.randn(512, 64), shape=[512, 64], strides=[64, 1], block_shape=[64, 64])
    other_block = TensorDescriptor(flat, shape=[512, 64], strides=[64, 1], block_shape=[32, 64])
    other_shape = TensorDescriptor(flat[:256], shape=[256, 64], strides=[64, 1], block_shape=[64, 64])
    assert _key(d) == _key(same)
    assert _key(d) != _key(other_block) and _key(d) != _key(other_shape)


def test_hooks_count_as_installed_only_when_present():
    assert not launch_module._hooked(None)
    assert launch_module._hooked(lambda *args: None)

    class EmptyChain:
        calls = []
    assert not launch_module._hooked(EmptyChain())


def test_gluon_descriptors_are_keyed_by_their_layout_too():
    hopper = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    gl = pytest.importorskip("triton.experimental.gluon.language")
    flat = torch.randn(512, 64, dtype=torch.float16)
    layout = gl.NVMMASharedLayout.get_default_for([64, 64], gl.float16)
    unswizzled = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    d = hopper.TensorDescriptor(flat, [512, 64], [64, 1], [64, 64], layout)
    same = hopper.TensorDescriptor(torch.randn(512, 64, dtype=torch.float16), [512, 64], [64, 1], [64, 64], layout)
    other = hopper.TensorDescriptor(flat, [512, 64], [64, 1], [64, 64], unswizzled)
    assert launch_module._UNCACHED not in spec(d)
    assert _key(d) == _key(same) and _key(d) != _key(other)


def test_a_gluon_kernel_is_matched_with_its_num_warps_constexpr():
    """Gluon kernels declare ``num_warps`` as a constexpr: the direct call passes it in its place."""
    pytest.importorskip("triton.experimental.gluon")
    from attnpkg.kernels.hopper_backward import hopper_backward_kernel
    launcher = launch_module._Launcher(hopper_backward_kernel)
    args = [None] * 18
    constexprs = dict(GROUP=1, VARLEN=False, LEFT=False, RIGHT=False, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=128,
                      NUM_STAGES=2)
    assert launcher._signature_matches(args, constexprs)
    assert launcher.constexpr_names[-1] == "num_warps" and len(launcher.constexpr_names) == 9
    assert not launcher._signature_matches(args[:-1], constexprs)
    assert not launcher._signature_matches(args, {**constexprs, "EXTRA": 1})
