"""The first thing every chapter of the book runs: where to compute and in which precision.

    from attnpkg.notebook import setup
    rt = setup()          # prints versions; rt.device, rt.dtype, rt.interpreted

On a CUDA GPU the kernels run compiled on it, in bfloat16 where the GPU supports it (compute
capability 8.0 and newer) and float16 otherwise (Colab's free T4). Without a GPU they run on the
CPU through Triton's interpreter (switched on when attnpkg is imported), in float16.
"""
import os
import platform
from dataclasses import dataclass

import torch


__all__ = ["Runtime", "setup", "show_source", "results_file"]


@dataclass(frozen=True)
class Runtime:
    """What :func:`setup` found: where the chapter's kernels run and in which precision.

    Attributes:
        device: the CUDA GPU when there is one, else the CPU.
        dtype: the half-precision type the kernels are shown in: ``torch.bfloat16`` on GPUs of
            compute capability 8.0 and newer, ``torch.float16`` on older ones and on the CPU.
        interpreted: True when Triton's interpreter runs the kernels on the CPU.
    """

    device: torch.device
    dtype: torch.dtype
    interpreted: bool

    @property
    def on_gpu(self) -> bool:
        """Whether the kernels run on a CUDA GPU."""
        return self.device.type == "cuda"


def setup(verbose: bool = True) -> Runtime:
    """Pick the device and kernel dtype for this machine and print the versions in use.

    Args:
        verbose: print the versions of attnpkg, torch, triton and Python, and the device.

    Returns:
        A :class:`Runtime`.
    """
    import triton

    import attnpkg

    if torch.cuda.is_available():
        device = torch.device("cuda")
        dtype = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
        where = torch.cuda.get_device_name()
    else:
        device, dtype, where = torch.device("cpu"), torch.float16, "CPU (Triton interpreter)"
    rt = Runtime(device, dtype, os.environ.get("TRITON_INTERPRET") == "1")
    if verbose:
        print(f"attnpkg {attnpkg.__version__} | torch {torch.__version__} | triton {triton.__version__} | "
              f"Python {platform.python_version()}")
        print(f"running on {where}, kernels in {str(dtype).removeprefix('torch.')}")
    return rt


def show_source(obj):
    """Display the source code of an attnpkg module, class, function or Triton kernel as it ships.

    The chapters call this instead of pasting code, so the book always shows the package's code.

    Args:
        obj: anything ``inspect.getsource`` accepts, or a ``@triton.jit`` kernel.

    Returns:
        An ``IPython.display.Code`` object, which a notebook shows with syntax highlighting.
    """
    import inspect

    from IPython.display import Code

    obj = getattr(obj, "fn", obj)          # a @triton.jit kernel wraps the Python function as .fn
    return Code(inspect.getsource(obj), language="python")


RAW_URL = "https://raw.githubusercontent.com/attnpkg/attention-gradients/main/"


def results_file(path):
    """A file committed to the repository, e.g. ``"benchmarks/h100/attention.csv"``: read from the
    checkout when the chapter runs in one (its folder or the one above, or where attnpkg is installed
    from), otherwise downloaded from the repository into the working folder (Colab)."""
    from pathlib import Path
    import urllib.request
    import attnpkg
    for root in (Path.cwd(), Path.cwd().parent, Path(attnpkg.__file__).resolve().parents[1]):
        if (root / path).is_file():
            return root / path
    local = Path(Path(path).name)
    urllib.request.urlretrieve(RAW_URL + path, local)
    return local
