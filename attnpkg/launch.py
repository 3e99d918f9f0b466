"""``launch(kernel)[grid](*args, **constexprs)``: a Triton launch with less host time per call.

``kernel[grid](...)`` binds every argument, works out its specialization, builds a cache key and
reads Triton's settings on each call. On a typical server CPU that is 30-50 us, as long as an
attention kernel at N = 1k runs on an H100, so small calls become bound by the host. ``launch``
keeps the compiled kernel that Triton returned on the first call of each *specialization* and
afterwards calls its launcher directly.

A compiled kernel may only serve arguments that Triton would have specialized the same way.
Triton looks at the values of integer arguments (1, divisible by 16, range) and at the dtype and
16-byte alignment of tensors. So the key holds the scalar arguments themselves, the dtype and
address modulo 16 of each tensor (and of the base of each tensor descriptor, with its shape,
strides, block shape and, for Gluon's descriptors, shared-memory layout), the constexprs, the
launch options and the device. A call that differs in any of them takes Triton's own path once
and gets its own entry: a training loop, which calls with the same shapes every step, pays
Triton's path once per shape.

The direct call uses Triton's launcher interface (``CompiledKernel.run``), which is internal. If
it is missing or answers differently (another Triton version), if a launch hook is installed (a
profiler), or under the interpreter, every call goes through ``kernel[grid]`` as usual.
"""
import functools
import os

import torch

try:                                         # Triton >= 3.4: settings and the active driver
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
except ImportError:
    _knobs = None

_DESCRIPTORS = []                            # Triton's tensor descriptors, and Gluon's for Hopper
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
    _DESCRIPTORS.append(TensorDescriptor)
except ImportError:
    pass
try:
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    _DESCRIPTORS.append(GluonDescriptor)
except ImportError:
    pass
_DESCRIPTORS = tuple(_DESCRIPTORS)

_direct = _knobs is not None                 # cleared if the direct call ever fails


_UNCACHED = object()
MAX_ENTRIES = 4096                             # distinct shapes kept per kernel before starting over


def _key(x):
    """What decides Triton's specialization for one non-int argument (ints are keyed by value)."""
    if isinstance(x, torch.Tensor):
        return x.dtype, x.data_ptr() % 16
    if isinstance(x, (bool, float)):           # typed, so True, 1 and 1.0 stay apart
        return type(x), x
    if isinstance(x, _DESCRIPTORS):            # Gluon's also carry the shared-memory layout of a block
        return (type(x), x.base.dtype, x.base.data_ptr() % 16, tuple(x.shape), tuple(x.strides),
                tuple(x.block_shape), x.padding, getattr(x, "layout", None))
    return _UNCACHED


def specialization(args):
    """The part of the cache key that comes from the runtime arguments."""
    return tuple([x if type(x) is int else _key(x) for x in args])


def _hooked(hook):
    """Whether a launch hook is installed: Triton >= 3.5 keeps a chain of hooks, empty by default."""
    return hook is not None and bool(getattr(hook, "calls", True))


class _Launcher:
    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}                     # specialization key -> Triton's CompiledKernel
        self.constexpr_names = None            # signature order, read on the first direct launch

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, num_warps=4, num_stages=3, maxnreg=None, **constexprs):   # Triton's defaults
        global _direct
        options = dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)
        if not _direct or os.environ.get("TRITON_INTERPRET") == "1" or \
                _hooked(_knobs.runtime.launch_enter_hook) or _hooked(_knobs.runtime.launch_exit_hook):
            return self.kernel[grid](*args, **options, **constexprs)
        grid = (*grid, 1, 1)[:3]
        device = _driver.active.get_current_device()
        spec = specialization(args)
        key = (device, num_warps, num_stages, maxnreg, tuple(constexprs.items()), spec)
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self.kernel[grid](*args, **options, **constexprs)
            if _UNCACHED not in spec and self._signature_matches(args, constexprs):
                if len(self.compiled) >= MAX_ENTRIES:
                    self.compiled.clear()
                self.compiled[key] = compiled
            return compiled
        try:
            # The launcher takes every parameter in signature order (constexprs are skipped by it).
            values = {**constexprs, "num_warps": num_warps}
            compiled.run(*grid, _driver.active.get_current_stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None,
                         *args, *(values[name] for name in self.constexpr_names))
        except (TypeError, AttributeError, ValueError):
            # Not the launcher interface this was written for: fall back for good. Nothing was
            # launched, since these errors come from unpacking the arguments.
            _direct = False
            return self.kernel[grid](*args, **options, **constexprs)
        return compiled

    def _signature_matches(self, args, constexprs):
        """The direct call passes ``args`` then the constexprs: the kernel must declare them in that order. A Gluon
        kernel also declares ``num_warps`` among its constexprs."""
        params = getattr(self.kernel, "params", None)
        if params is None:
            return False
        names = [p.name for p in params]
        flags = [p.is_constexpr for p in params]
        n = len(args)
        expected = set(constexprs) | ({"num_warps"} & set(names[n:]))
        if len(params) != n + len(expected) or any(flags[:n]) or set(names[n:]) != expected:
            return False
        self.constexpr_names = names[n:]
        return True


@functools.lru_cache(maxsize=None)
def launch(kernel):
    """``launch(kernel)[grid](*args, num_warps=..., num_stages=..., maxnreg=..., **constexprs)`` launches
    ``kernel`` like ``kernel[grid](...)``: runtime arguments by position, constexprs by name."""
    return _Launcher(kernel)
