"""A conformance report for any attention function, checked against the mathematics from the outside.

    from attnpkg import check
    report = check.attention(my_attention)        # SDPA's or attnpkg's calling convention
    report.ok, report.failures                    # a table in a notebook, a text report in a terminal

or from a shell::

    python -m attnpkg.check sdpa                  # every SDPA backend this machine has
    python -m attnpkg.check attnpkg               # attnpkg.flash_attention

The function under test is called as ``fn(q, k, v, <causal>=..., <scale>=...)`` with tensors in
SDPA's layout ``(B, H, N, D)``; the keyword names are read from its signature (``is_causal`` or
``causal``; ``scale``, ``softmax_scale`` or ``sm_scale``; ``enable_gqa`` is set for grouped-query
inputs; ``return_lse=True`` is passed where the function has that argument). A function that
returns a tuple ``(o, lse, ...)`` has its lse checked too. :func:`flash_attn_layout` adapts a
function of flash-attn's ``(B, N, H, D)`` layout, :func:`sdpa` runs SDPA in one chosen backend.

Everything is compared with a float64 evaluation of the formulas of :mod:`attnpkg.reference`
(written out here with the closed-form gradients of :mod:`attnpkg.grads`, so that each can be
varied). The function runs in float64 where it accepts it; otherwise in the first of float32,
bfloat16, float16 that it accepts, under flash-attn's rule: its error may be at most twice the
error of the same formulas evaluated by PyTorch in that dtype, plus a small floor. A mismatch is
compared with the results of typical mistakes (causal mask aligned top-left, scale dropped or
ignored, grouped-query heads mapped ``h % Hkv``, lse in base 2, dS transposed in the backward) and
reported as the one it matches; otherwise the report says what it sees (NaN, a constant factor,
a transpose, the worst entry).

Conventions that differ between libraries are declared, not guessed: ``causal_alignment``
("bottom_right", attnpkg's and flash-attn's convention, or "top_left", SDPA's for ``Nq != Nk``;
``None`` to accept either and report which one was found) and ``deterministic`` (True: the backward
must give the same bits on every run; None: report what was found without failing).
"""
import argparse
import contextlib
import html
import inspect
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["attention", "sdpa", "sdpa_backends", "flash_attn_layout", "planted_mistakes", "reference_pass", "Report",
           "Finding", "describe_mismatch", "max_error", "main"]

LOG2E = 1.4426950408889634
ALIGNMENTS = ("bottom_right", "top_left")
_FLOOR = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


# --------------------------------------------------------------------------------------------------
# The result: findings and a report that prints as text and shows as a table in a notebook.

@dataclass
class Finding:
    """One row of a report: a check of the battery on one case."""
    check: str                     # the battery entry, e.g. "causal alignment"
    case: str                      # the inputs, e.g. "B=1 H=2 Nq=19 Nk=45 D=16"
    status: str                    # "pass", "FAIL", "skip" or "note" (informative, not a failure)
    message: str = ""
    diagnosis: str = ""            # for a failure: the cause found, e.g. "causal aligned top-left"
    errors: dict = field(default_factory=dict)   # quantity -> (max error, allowed error)


_MARK = {"pass": "ok", "FAIL": "FAIL", "skip": "skip", "note": "note", "todo": "todo"}
_COLOUR = {"pass": "#1a7f37", "FAIL": "#cf222e", "skip": "#6e7781", "note": "#9a6700", "todo": "#9a6700"}


class Report:
    """What a check found: ``.ok``, ``.failures`` (findings with their errors and diagnoses), ``.skipped``.

    ``str(report)`` is a text table; in a notebook the report shows as an HTML table.
    """

    def __init__(self, title: str, findings: list, setup: str = ""):
        self.title, self.findings, self.setup = title, list(findings), setup

    @property
    def failures(self) -> list:
        return [f for f in self.findings if f.status == "FAIL"]

    @property
    def skipped(self) -> list:
        return [f for f in self.findings if f.status == "skip"]

    @property
    def passed(self) -> list:
        return [f for f in self.findings if f.status == "pass"]

    @property
    def ok(self) -> bool:
        """No failure, and at least one check passed (a function that supports nothing is not ok)."""
        return not self.failures and bool(self.passed) and not any(f.status == "todo" for f in self.findings)

    @property
    def diagnoses(self) -> set:
        """The causes found for the failures (one short phrase each)."""
        return {f.diagnosis for f in self.failures}

    def summary(self) -> str:
        if any(f.status == "todo" for f in self.findings):
            return "not attempted yet"
        counts = [f"{len(self.passed)} passed", f"{len(self.failures)} failed", f"{len(self.skipped)} skipped"]
        return ("OK: " if self.ok else "NOT OK: ") + ", ".join(counts)

    def assert_ok(self):
        """Raise AssertionError with the whole report unless ``ok``; returns the report (to display it)."""
        if not self.ok:
            raise AssertionError(str(self))
        return self

    def __str__(self) -> str:
        lines = [f"{self.title}: {self.summary()}"] + ([self.setup] if self.setup else [])
        width = max([len(f.check) for f in self.findings] + [5])
        case_width = max([len(f.case) for f in self.findings] + [4])
        for f in self.findings:
            text = f.message + (f" [{f.diagnosis}]" if f.diagnosis and f.diagnosis not in f.message else "")
            lines.append(f"  {_MARK[f.status]:<4}  {f.check:<{width}}  {f.case:<{case_width}}  {text}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        todo = any(f.status == "todo" for f in self.findings)
        colour = "#1a7f37" if self.ok else _COLOUR["todo"] if todo else "#cf222e"
        rows = []
        for f in self.findings:
            text = html.escape(f.message)
            if f.diagnosis and f.diagnosis not in f.message:
                text += f" <b>[{html.escape(f.diagnosis)}]</b>"
            rows.append(f"<tr><td style='color:{_COLOUR[f.status]};font-weight:bold'>{_MARK[f.status]}</td>"
                        f"<td>{html.escape(f.check)}</td><td><code>{html.escape(f.case)}</code></td>"
                        f"<td style='text-align:left'>{text}</td></tr>")
        setup = f"<br><small>{html.escape(self.setup)}</small>" if self.setup else ""
        return (f"<div><b>{html.escape(self.title)}</b>: <span style='color:{colour};font-weight:bold'>"
                f"{html.escape(self.summary())}</span>{setup}"
                "<table><thead><tr><th></th><th>check</th><th>case</th><th style='text-align:left'>result</th>"
                f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


# --------------------------------------------------------------------------------------------------
# Comparing tensors, and saying what is wrong with one.

def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest ``|x - ref|`` (NaN counts as infinite; equal infinities as 0)."""
    if x.numel() == 0:
        return 0.0
    x, ref = x.double(), ref.double()
    same_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    err = torch.where(same_inf, 0.0, (x - ref).abs())
    return float("inf") if err.isnan().any() else err.max().item()


def _close(got, want, atol: float) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == want.shape and max_error(got, want) <= atol)


def _index(flat_index: int, shape) -> tuple:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), tuple(shape)))


def describe_mismatch(name: str, got, want: torch.Tensor, atol: float, alternatives=()) -> str:
    """One sentence on how ``got`` differs from ``want`` (the caller knows that it does).

    ``alternatives``: pairs (description, tensor) of typical wrong answers; the first that ``got``
    matches is named. Otherwise: not a tensor, wrong shape (or transposed), NaN or infinity, a
    constant factor or the wrong sign, the right numbers in the wrong places, or the worst entry."""
    if not isinstance(got, torch.Tensor):
        return f"{name} is a {type(got).__name__}, expected a tensor of shape {tuple(want.shape)}"
    got_d, want_d = got.detach().double().cpu(), want.detach().double().cpu()
    for description, alt in alternatives:
        if _close(got_d, alt.detach().double().cpu(), atol):
            return f"{name}: {description}"
    if got_d.shape != want_d.shape:
        if want_d.dim() >= 2 and _close(got_d, want_d.transpose(-2, -1), atol):
            return f"{name} is transposed: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got_d.numel() == want_d.numel() and _close(got_d.flatten().sort().values,
                                                      want_d.flatten().sort().values, atol):
            return (f"{name} has the right numbers but shape {tuple(got.shape)}, expected {tuple(want.shape)} "
                    "(a reshape or sum over the wrong dimensions?)")
        return f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    bad = ~torch.isfinite(got_d) & torch.isfinite(want_d)
    if bad.any():
        first = _index(int(bad.flatten().nonzero()[0]), got_d.shape)
        kind = "NaN" if got_d.isnan().any() else "infinite"
        return f"{name} is {kind} in {int(bad.sum())} of {got_d.numel()} entries (first at {list(first)})"
    finite = torch.isfinite(want_d)
    g, w = got_d[finite], want_d[finite]
    if want_d.dim() >= 2 and want_d.shape[-1] == want_d.shape[-2] and _close(got_d, want_d.transpose(-2, -1), atol):
        return f"{name} is transposed (it equals the expected value's transpose)"
    if w.numel() and (w * w).sum() > 0:
        c = ((g * w).sum() / (w * w).sum()).item()
        if abs(c - 1) > 1e-3 and _close(got_d, c * want_d, atol + 1e-6 * want_d.abs().max().item()):
            if abs(c + 1) < 1e-3:
                return f"{name} has the wrong sign"
            return f"{name} is {c:.4g} times the right value (a factor missing or extra?)"
    if got_d.numel() > 1 and _close(got_d.flatten().sort().values, want_d.flatten().sort().values, atol):
        return f"{name} has the right numbers in the wrong places (indices or a reshape mixed up?)"
    err = torch.where(finite, (got_d - want_d).abs(), torch.zeros_like(got_d))
    wrong = int((err > atol).sum())
    worst = _index(int(err.flatten().argmax()), got_d.shape)
    return (f"{name} is wrong in {wrong} of {got_d.numel()} entries; worst at {list(worst)}: "
            f"{got_d[worst].item():.6g}, expected {want_d[worst].item():.6g}")


# --------------------------------------------------------------------------------------------------
# The reference, with the variations that typical mistakes make.

def _mask(n_q, n_k, alignment, device):
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return j <= i + (n_k - n_q) if alignment == "bottom_right" else j <= i


def reference_pass(q, k, v, do=None, dlse=None, *, causal=False, scale=None, alignment="bottom_right",
                   kv_heads="interleave", lse_base2=False, ds_transposed=False):
    """Attention forward and backward from the formulas, in the inputs' dtype: dict of o, lse, dq, dk, dv.

    The defaults are the mathematics (attnpkg.reference.attention and attnpkg.grads.attention_backward,
    with the lse's gradient ``dlse`` folded into D). The keyword arguments make the typical mistakes:
    ``alignment="top_left"`` (query i sees keys j <= i), ``kv_heads="tiled"`` (query head h uses kv head
    h % Hkv), ``lse_base2`` (lse in base 2, and its gradient), ``ds_transposed`` (dQ = scale dS^T K and
    dK = scale dS Q, Nq == Nk only)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n_heads, n_kv_heads = (q.shape[-3], k.shape[-3]) if q.dim() >= 3 else (1, 1)
    group = n_heads // n_kv_heads
    if group > 1:
        expand = ((lambda x: x.repeat_interleave(group, dim=-3)) if kv_heads == "interleave"
                  else (lambda x: x.repeat(*([1] * (x.dim() - 3)), group, 1, 1)))
        kx, vx = expand(k), expand(v)
    else:
        kx, vx = k, v
    s = scale * (q @ kx.transpose(-2, -1))
    if causal:
        s = s.masked_fill(~_mask(q.shape[-2], k.shape[-2], alignment, s.device), float("-inf"))
    m = s.amax(dim=-1, keepdim=True) if s.shape[-1] else torch.full_like(s[..., :1], float("-inf"))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l > 0, l, torch.ones_like(l))
    lse = (m + torch.log(l)).squeeze(-1)
    o = p @ vx
    s_max = s[torch.isfinite(s)].abs().max() if torch.isfinite(s).any() else s.new_zeros(())
    out = {"o": o, "lse": lse * LOG2E if lse_base2 else lse, "s_max": s_max}
    if do is None:
        return out
    dv = p.transpose(-2, -1) @ do
    dp = do @ vx.transpose(-2, -1)
    delta = (do * o).sum(dim=-1)
    if dlse is not None:
        delta = delta - dlse * (LOG2E if lse_base2 else 1.0)
    ds = p * (dp - delta[..., None])
    if ds_transposed:
        dq, dk = scale * (ds.transpose(-2, -1) @ kx), scale * (ds @ q)
    else:
        dq, dk = scale * (ds @ kx), scale * (ds.transpose(-2, -1) @ q)
    if group > 1:
        fold = ((lambda x: x.unflatten(-3, (n_kv_heads, group)).sum(dim=-3)) if kv_heads == "interleave"
                else (lambda x: x.unflatten(-3, (group, n_kv_heads)).sum(dim=-4)))
        dk, dv = fold(dk), fold(dv)
    out.update(dq=dq, dk=dk, dv=dv)
    return out


# --------------------------------------------------------------------------------------------------
# The function under test, called in one convention.

class _Unsupported(Exception):
    """The function does not take an argument that a case needs."""


def sdpa(backend=None):
    """``torch.nn.functional.scaled_dot_product_attention`` in attnpkg's convention, restricted to ``backend``.

    ``backend``: a ``torch.nn.attention.SDPBackend`` or its name ("math", "flash", "efficient",
    "cudnn"); None lets PyTorch choose. ``enable_gqa`` is set for grouped-query inputs. SDPA aligns
    a causal mask top-left when ``Nq != Nk``, and the returned function declares that convention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    chosen = names[backend] if isinstance(backend, str) else backend
    label = next((n for n, b in names.items() if b == chosen), "auto") if chosen is not None else "auto"

    def sdpa_attention(q, k, v, *, causal=False, scale=None):
        context = sdpa_kernel(chosen) if chosen is not None else contextlib.nullcontext()
        with context:
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[-3] != k.shape[-3])

    sdpa_attention.__name__ = sdpa_attention.__qualname__ = f"sdpa[{label}]"
    sdpa_attention.causal_alignment = "top_left"
    return sdpa_attention


def flash_attn_layout(fn, *, lse=False):
    """Adapt a function of flash-attn's convention, ``fn(q, k, v, causal=..., softmax_scale=...)`` with
    tensors ``(B, N, H, D)`` (``flash_attn.flash_attn_func``), to the layout the check uses.

    With ``lse=True`` it is called with ``return_attn_probs=True`` and its second result, the lse of
    shape ``(B, H, Nq)``, is checked too."""
    def adapted(q, k, v, *, causal=False, scale=None, return_lse=False):
        extra = {"return_attn_probs": True} if return_lse else {}
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, softmax_scale=scale, **extra)
        if return_lse:
            return out[0].transpose(1, 2), out[1]
        return out.transpose(1, 2)

    if not lse:
        def adapted_o(q, k, v, *, causal=False, scale=None):
            return adapted(q, k, v, causal=causal, scale=scale)
        result = adapted_o
    else:
        result = adapted
    result.__name__ = result.__qualname__ = f"{getattr(fn, '__name__', 'fn')} (B, N, H, D)"
    result.causal_alignment = getattr(fn, "causal_alignment", "bottom_right")
    return result


class _Caller:
    """Calls ``fn`` with the keyword names its signature uses; returns (o, lse or None)."""

    def __init__(self, fn):
        if fn is torch.nn.functional.scaled_dot_product_attention:
            fn = sdpa()
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        names = set(params)
        var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.causal_kw = next((n for n in ("is_causal", "causal") if n in names), "causal" if var_kw else None)
        self.scale_kw = next((n for n in ("scale", "softmax_scale", "sm_scale") if n in names),
                             "scale" if var_kw else None)
        self.gqa_kw = "enable_gqa" if "enable_gqa" in names else None
        self.lse_kw = "return_lse" if "return_lse" in names else None

    def __call__(self, q, k, v, causal=False, scale=None):
        kwargs = {}
        if causal:
            if self.causal_kw is None:
                raise _Unsupported(f"{self.name} takes no causal argument")
            kwargs[self.causal_kw] = True
        if scale is not None:
            if self.scale_kw is None:
                raise _Unsupported(f"{self.name} takes no scale argument")
            kwargs[self.scale_kw] = scale
        if self.gqa_kw and q.shape[-3] != k.shape[-3]:
            kwargs[self.gqa_kw] = True
        if self.lse_kw:
            kwargs[self.lse_kw] = True
        out = self.fn(q, k, v, **kwargs)
        if isinstance(out, (tuple, list)):
            lse = out[1] if len(out) > 1 and isinstance(out[1], torch.Tensor) else None
            return out[0], lse
        return out, None


# --------------------------------------------------------------------------------------------------
# The battery.

@dataclass
class _Case:
    check: str
    b: int
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    causal: bool = False
    scale: Optional[float] = None
    strided: bool = False
    logits: str = "normal"         # "normal", "large" (|S| ~ 1000) or "negative" (S ~ -1000)
    with_dlse: bool = False

    @property
    def label(self) -> str:
        heads = f"H={self.hq}" if self.hq == self.hkv else f"Hq={self.hq} Hkv={self.hkv}"
        n = f"N={self.nq}" if self.nq == self.nk else f"Nq={self.nq} Nk={self.nk}"
        extra = [f"scale={self.scale:g}" if self.scale is not None else "", "causal" if self.causal else "",
                 "strided" if self.strided else "", {"large": "|S|~1e3", "negative": "S~-1e3"}.get(self.logits, "")]
        return " ".join([f"B={self.b}", heads, n, f"D={self.d}", *filter(None, extra)])


def _battery(quick: bool):
    c = _Case
    cases = [
        c("output and gradients", 2, 3, 3, 37, 37, 24),
        c("output and gradients", 1, 2, 2, 23, 45, 16),
        c("output and gradients", 1, 1, 1, 70, 9, 40),
        c("causal", 1, 2, 2, 37, 37, 24, causal=True),
        c("causal alignment", 1, 2, 2, 19, 45, 16, causal=True),
        c("rows that see no key", 1, 2, 2, 45, 19, 16, causal=True),
        c("grouped-query heads", 1, 6, 2, 21, 21, 16),
        c("grouped-query heads", 1, 6, 2, 21, 21, 16, causal=True),
        c("scale", 1, 2, 2, 21, 21, 16, scale=0.3),
        c("scale", 1, 2, 2, 21, 21, 16, scale=1.7),
        c("log-sum-exp", 1, 2, 2, 21, 29, 16, with_dlse=True),
        c("strided inputs", 2, 2, 2, 21, 21, 24, strided=True),
        c("large and small logits", 1, 2, 2, 21, 21, 16, logits="large"),
        c("large and small logits", 1, 2, 2, 21, 21, 16, logits="negative"),
    ]
    if quick:   # one case per check
        seen, kept = set(), []
        for case in cases:
            if case.check not in seen:
                seen.add(case.check)
                kept.append(case)
        cases = kept
    return cases


def _inputs(case: _Case, dtype, device, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)

    if case.strided:   # flash-attn's layout seen through SDPA's: (B, N, H, D) transposed, rows padded to D + 8
        q = randn(case.b, case.nq, case.hq, case.d + 8)[..., :case.d].transpose(1, 2)
        k = randn(case.b, case.nk, case.hkv, case.d + 8)[..., :case.d].transpose(1, 2)
        v = randn(case.b, case.nk, case.hkv, case.d + 8)[..., :case.d].transpose(1, 2)
    else:
        q = randn(case.b, case.hq, case.nq, case.d)
        k, v = randn(case.b, case.hkv, case.nk, case.d), randn(case.b, case.hkv, case.nk, case.d)
    if case.logits == "large":          # logits of standard deviation 300, up to ~1000: exp overflows unshifted
        q, k = q * math.sqrt(300), k * math.sqrt(300)
    elif case.logits == "negative":      # every logit near -1000: exp underflows to 0 without the max shift
        c = math.sqrt(1000 * math.sqrt(case.d))
        q, k = q.clone(), k.clone()
        q[..., 0], k[..., 0] = c, -c
    do = randn(case.b, case.hq, case.nq, case.d)
    dlse = randn(case.b, case.hq, case.nq) if case.with_dlse else None
    cast = lambda t: t if t is None else (t.to(dtype) if not case.strided or t.dim() < 4 else _restride(t, dtype))
    return cast(q), cast(k), cast(v), do.to(dtype), None if dlse is None else dlse.to(dtype)


def _restride(t, dtype):
    """Cast a strided view to ``dtype`` keeping a strided layout (``.to`` would make it contiguous)."""
    b, h, n, d = t.shape
    base = torch.zeros(b, n, h, d + 8, dtype=dtype, device=t.device)
    view = base[..., :d].transpose(1, 2)
    view.copy_(t)
    return view


def _hypotheses(case: _Case, alignment: str, has_lse: bool):
    """(description, reference keyword arguments) of the mistakes this case could reveal."""
    scale = 1.0 / math.sqrt(case.d) if case.scale is None else case.scale
    hyps = []
    if case.causal and case.nq != case.nk:
        other = "top_left" if alignment == "bottom_right" else "bottom_right"
        words = {"top_left": "causal aligned top-left (query i sees keys j <= i)",
                 "bottom_right": "causal aligned bottom-right (query i sees keys j <= i + Nk - Nq)"}
        hyps.append((words[other], {"alignment": other}))
    if case.causal:
        hyps.append(("causal mask ignored", {"causal": False}))
    if case.scale is not None:
        hyps.append(("explicit scale ignored (uses 1/sqrt(D))", {"scale": None}))
    if scale != 1.0:
        hyps.append(("scale dropped (logits q.k not multiplied by the scale)", {"scale": 1.0}))
    if case.hq != case.hkv and case.hkv > 1:
        hyps.append(("grouped-query heads mapped h % Hkv (expected h // (Hq/Hkv))", {"kv_heads": "tiled"}))
    if has_lse:
        hyps.append(("lse in base 2 (log2 instead of the natural log)", {"lse_base2": True}))
    if case.nq == case.nk:
        hyps.append(("dS transposed in the backward (dQ = scale dS^T K, dK = scale dS Q)", {"ds_transposed": True}))
    return hyps


def _run(caller, q, k, v, case, do, dlse, want_grads):
    """Call the function and backpropagate: dict of o, lse (if returned), dq, dk, dv (if differentiable)."""
    if want_grads:
        q, k, v = (t.detach().requires_grad_() if t.is_contiguous() else _leaf_view(t) for t in (q, k, v))
    o, lse = caller(q, k, v, causal=case.causal, scale=case.scale)
    got = {"o": o.detach()}
    if lse is not None:
        got["lse"] = lse.detach()
    if want_grads and o.requires_grad:
        outputs, grads_out = [o], [do]
        if dlse is not None and lse is not None and lse.requires_grad:
            outputs.append(lse)
            grads_out.append(dlse.to(lse.dtype))
        dq, dk, dv = torch.autograd.grad(outputs, (q, k, v), grads_out, allow_unused=True)
        for name, g, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            got[name] = torch.zeros_like(x) if g is None else g.detach()
    return got


def _leaf_view(t):
    """A strided view of a new leaf tensor that requires grad (so the function sees the strides)."""
    b, h, n, d = t.shape
    base = torch.zeros(b, n, h, d + 8, dtype=t.dtype, device=t.device)
    base[..., :d].copy_(t.transpose(1, 2))
    base.requires_grad_()
    return base[..., :d].transpose(1, 2)


class _Battery:
    def __init__(self, caller, device, dtype, alignment, deterministic, determinism_runs, seed):
        self.caller, self.device, self.dtype = caller, device, dtype
        self.alignment, self.deterministic, self.runs, self.seed = alignment, deterministic, determinism_runs, seed
        self.detected_alignment = None
        self.differentiable = True

    def generator(self, i):
        return torch.Generator().manual_seed(self.seed + 1000 * i)

    def tolerances(self, exact, same, names):
        """Allowed error per quantity: 2 x PyTorch's error in the dtype + floor x the quantity's size.

        The floor grows with the largest logit: a kernel that stores the lse in float32 and recomputes
        P = exp(S - lse) from it (every FlashAttention backward) has a relative error of about
        |lse| x eps(float32) in P, which PyTorch's materialised P does not have."""
        eps = torch.finfo(torch.float64 if self.dtype == torch.float64 else torch.float32).eps
        floor = _FLOOR.get(self.dtype, 1e-5) + 4 * eps * exact["s_max"].item()
        grads = [n for n in ("dq", "dk", "dv") if n in exact]
        size = lambda ns: max([1.0] + [exact[n][torch.isfinite(exact[n])].abs().max().item()
                                        for n in ns if exact[n].numel() and torch.isfinite(exact[n]).any()])
        sizes = {"o": size(["o"]), "lse": size(["lse"]), **dict.fromkeys(grads, size(grads))}
        return {n: 2 * max_error(same[n].double(), exact[n]) + floor * sizes[n] for n in names}

    def references(self, case, q, k, v, do, dlse, **variant):
        kw = dict(causal=case.causal, scale=case.scale,
                  alignment=self.alignment or self.detected_alignment or "bottom_right")
        kw.update(variant)
        exact = reference_pass(*(t.double() for t in (q, k, v, do)), None if dlse is None else dlse.double(), **kw)
        if self.dtype == torch.float64:
            return exact, exact
        same = reference_pass(q.detach(), k.detach(), v.detach(), do, dlse, **kw)
        return exact, same

    def run_case(self, i, case: _Case) -> Finding:
        q, k, v, do, dlse = _inputs(case, self.dtype, self.device, self.generator(i))
        try:
            got = _run(self.caller, q, k, v, case, do, dlse, self.differentiable)
        except _Unsupported as e:
            return Finding(case.check, case.label, "skip", str(e))
        except Exception as e:  # noqa: BLE001 - a function that raises does not support the case
            if i == 0:
                return Finding(case.check, case.label, "FAIL", f"raised {type(e).__name__}: {_first_line(e)}",
                               diagnosis="raises on the basic case")
            return Finding(case.check, case.label, "skip", f"not supported: raised {type(e).__name__}: {_first_line(e)}")
        if "dq" not in got and self.differentiable:
            self.differentiable = False
        if case.check == "log-sum-exp" and "lse" not in got:
            return Finding(case.check, case.label, "skip", "the function does not return the lse")
        if case.check == "rows that see no key":
            return self.empty_rows(case, q, k, v, do, dlse, got)
        exact, same = self.references(case, q, k, v, do, dlse)
        names = [n for n in got if n in exact]
        tol = self.tolerances(exact, same, names)
        errors = {n: (max_error(got[n], exact[n]) if got[n].shape == exact[n].shape else float("inf"), tol[n])
                  for n in names}
        wrong = [n for n in names if errors[n][0] > errors[n][1]]
        what = ", ".join(names)
        if case.check == "causal alignment":
            return self.alignment_finding(case, q, k, v, do, dlse, got, names, errors, wrong)
        if not wrong:
            return Finding(case.check, case.label, "pass", f"{what} within tolerance", errors=errors)
        return self.failure(case, q, k, v, do, dlse, got, names, errors, wrong, tol, exact)

    def failure(self, case, q, k, v, do, dlse, got, names, errors, wrong, tol, exact, check=None):
        for description, variant in _hypotheses(case, self.alignment, "lse" in got):
            alt, alt_same = self.references(case, q, k, v, do, dlse, **variant)
            if all(_close(got[n].double(), alt[n], 2 * tol[n] + 2 * max_error(alt_same[n].double(), alt[n]))
                   for n in names):
                return Finding(check or case.check, case.label, "FAIL", f"{', '.join(wrong)} wrong: {description}",
                               diagnosis=_short(description), errors=errors)
        details = "; ".join(describe_mismatch(n, got[n], exact[n], tol[n]) for n in wrong)
        nan = any(not torch.isfinite(got[n]).all() and torch.isfinite(exact[n]).all() for n in wrong)
        return Finding(check or case.check, case.label, "FAIL", details,
                       diagnosis="NaN or infinity" if nan else f"{', '.join(wrong)} wrong", errors=errors)

    def alignment_finding(self, case, q, k, v, do, dlse, got, names, errors, wrong):
        found = {}
        for alignment in ALIGNMENTS:
            exact, same = self.references(case, q, k, v, do, dlse, alignment=alignment)
            tol = self.tolerances(exact, same, names)
            found[alignment] = all(_close(got[n].double(), exact[n], tol[n]) for n in names)
        words = {"bottom_right": "bottom-right (query i sees keys j <= i + Nk - Nq)",
                 "top_left": "top-left (query i sees keys j <= i)"}
        match = next((a for a in ALIGNMENTS if found[a]), None)
        self.detected_alignment = match
        if match is None:
            exact, same = self.references(case, q, k, v, do, dlse)
            tol = self.tolerances(exact, same, names)
            return self.failure(case, q, k, v, do, dlse, got, names, errors, wrong, tol, exact)
        if self.alignment is None or match == self.alignment:
            declared = "as declared" if self.alignment else "detected; no alignment declared"
            return Finding(case.check, case.label, "pass", f"causal mask aligned {words[match]}, {declared}", errors=errors)
        return Finding(case.check, case.label, "FAIL",
                       f"causal mask aligned {words[match]}, but {words[self.alignment].split(' (')[0]} is declared",
                       diagnosis=f"causal aligned {words[match].split(' (')[0]}", errors=errors)

    def empty_rows(self, case, q, k, v, do, dlse, got):
        alignment = self.detected_alignment or self.alignment
        if alignment == "top_left":
            return Finding(case.check, case.label, "skip", "the causal mask is aligned top-left (see causal alignment): "
                                                           "every query sees key 0, no row is empty")
        n_empty = case.nq - case.nk
        exact, same = self.references(case, q, k, v, do, dlse, alignment="bottom_right")
        o_rows = got["o"][..., :n_empty, :]
        problems = []
        if o_rows.isnan().any():
            problems.append("output NaN")
        elif (o_rows != 0).any():
            problems.append(f"output {o_rows.abs().max().item():.3g} (not 0)")
        if "lse" in got:
            lse_rows = got["lse"][..., :n_empty]
            if lse_rows.isnan().any():
                problems.append("lse NaN")
            elif not (lse_rows == float("-inf")).all():
                problems.append(f"lse {lse_rows[lse_rows != float('-inf')].flatten()[0].item():.3g} (not -inf)")
        for name in ("dq", "dk", "dv"):
            if name in got and got[name].isnan().any():
                problems.append(f"{name} NaN")
        if "dq" in got and (got["dq"][..., :n_empty, :].nan_to_num(1.0) != 0).any():
            problems.append("dq of those rows not 0")
        if problems:
            nan = any("NaN" in p for p in problems)
            return Finding(case.check, case.label, "FAIL",
                           f"the first {n_empty} queries see no key: " + ", ".join(problems)
                           + " (expected output 0, lse -inf, no NaN)",
                           diagnosis="rows that see no key give NaN" if nan else "rows that see no key are not 0 / -inf")
        names = [n for n in got if n in exact]
        tol = self.tolerances(exact, same, names)
        errors = {n: (max_error(got[n], exact[n]), tol[n]) for n in names}
        wrong = [n for n in names if errors[n][0] > errors[n][1]]
        if wrong:
            return self.failure(case, q, k, v, do, dlse, got, names, errors, wrong, tol, exact)
        return Finding(case.check, case.label, "pass",
                       f"the first {n_empty} queries see no key: output 0" + (", lse -inf" if "lse" in got else "") +
                       ", no NaN; the other rows within tolerance", errors=errors)

    def determinism(self) -> Finding:
        case = _Case("determinism", 1, 4, 2, 80, 80, 32)
        if not self.differentiable:
            return Finding(case.check, case.label, "skip", "the output is not differentiable")
        q, k, v, do, _ = _inputs(case, self.dtype, self.device, self.generator(99))
        try:
            runs = [_run(self.caller, q, k, v, case, do, None, True) for _ in range(self.runs)]
        except Exception as e:  # noqa: BLE001
            return Finding(case.check, case.label, "skip", f"not supported: raised {type(e).__name__}: {_first_line(e)}")
        differ = [n for n in ("o", "dq", "dk", "dv") if n in runs[0]
                  and any(not torch.equal(r[n], runs[0][n]) for r in runs[1:])]
        if not differ:
            return Finding(case.check, case.label, "pass", f"o, dq, dk, dv identical bit for bit over {self.runs} runs")
        spread = max(max_error(r[n], runs[0][n]) for n in differ for r in runs[1:])
        message = f"{', '.join(differ)} differ between {self.runs} runs on the same inputs (by up to {spread:.3g})"
        if self.deterministic:
            return Finding(case.check, case.label, "FAIL", message, diagnosis="backward not deterministic")
        return Finding(case.check, case.label, "note", message + "; not required (deterministic=None)")


def _short(description: str) -> str:
    """The diagnosis of a hypothesis: its description without the explanation in parentheses at the end."""
    if not description.endswith(")"):
        return description
    depth = 0
    for i in range(len(description) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(description[i], 0)
        if depth == 0:
            return description[:i].rstrip()
    return description


@contextlib.contextmanager
def _quiet():
    """No RuntimeWarnings from NumPy (Triton's interpreter computes with it): the report says what went wrong."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _dtype_candidates(device):
    candidates = [torch.float64, torch.float32]
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        candidates.append(torch.bfloat16)
    return candidates + [torch.float16]


def attention(fn: Callable, *, device=None, dtype=None, name: Optional[str] = None,
              causal_alignment="declared", deterministic: Optional[bool] = None,
              determinism_runs: int = 3, quick: bool = False, seed: int = 0) -> Report:
    """Run the conformance battery on the attention function ``fn``; returns a :class:`Report`.

    Args:
        fn: ``fn(q, k, v, ...)`` with tensors ``(B, H, N, D)`` (see the module's docstring for the
            keywords it may take); use :func:`flash_attn_layout` for ``(B, N, H, D)`` functions and
            :func:`sdpa` for SDPA in one backend (``torch.nn.functional.scaled_dot_product_attention``
            itself is accepted too).
        device: where to run; the GPU if there is one, else the CPU.
        dtype: the dtype to check in; by default float64 if ``fn`` accepts it, else float32,
            bfloat16, float16, the first that ``fn`` accepts.
        causal_alignment: "bottom_right", "top_left", or None (accept either, report which); by
            default ``fn.causal_alignment`` if the function declares it, else "bottom_right".
        deterministic: True: a backward that differs between runs is a failure; None: it is reported.
        quick: one case per check instead of the whole battery.

    The battery: output and gradients on several shapes (ragged lengths, Nq != Nk, head dims that
    are not powers of two); causal with Nq = Nk; causal alignment with Nq < Nk; rows that see no key
    (Nq > Nk); grouped-query heads (Hq = 3 Hkv, causal or not); explicit scales; the lse and its
    gradient (if returned); strided inputs; logits near +-1000; determinism of the backward.
    """
    caller = _Caller(fn)
    name = name or caller.name
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if causal_alignment == "declared":
        causal_alignment = getattr(caller.fn, "causal_alignment", "bottom_right")
    if causal_alignment not in (*ALIGNMENTS, None):
        raise ValueError(f"causal_alignment must be 'bottom_right', 'top_left' or None, got {causal_alignment!r}")
    notes = []
    if dtype is None:
        probe = _Case("probe", 1, 1, 1, 8, 8, 16)
        for candidate in _dtype_candidates(device):
            q, k, v, _, _ = _inputs(probe, candidate, device, torch.Generator().manual_seed(seed))
            try:
                caller(q, k, v)
                dtype = candidate
                break
            except Exception as e:  # noqa: BLE001
                notes.append(f"{str(candidate).removeprefix('torch.')} not accepted "
                             f"({type(e).__name__}: {_first_line(e)[:80]})")
        else:
            dtype = torch.float64       # nothing works: the basic case will fail and say why
    battery = _Battery(caller, device, dtype, causal_alignment, deterministic, determinism_runs, seed)
    with _quiet():
        findings = [battery.run_case(i, case) for i, case in enumerate(_battery(quick))]
        findings.append(battery.determinism())
    tolerance = "float64 against float64" if dtype == torch.float64 else \
        f"{str(dtype).removeprefix('torch.')}: error <= 2 x PyTorch's {str(dtype).removeprefix('torch.')} error + floor"
    aligned = {None: "either (reported)", "bottom_right": "bottom-right", "top_left": "top-left"}[causal_alignment]
    setup = (f"device {device}, dtype {str(dtype).removeprefix('torch.')} ({tolerance}); causal alignment declared: "
             f"{aligned}; deterministic backward required: {bool(deterministic)}")
    if notes:
        setup += "; " + "; ".join(notes)
    return Report(f"attnpkg.check.attention({name})", findings, setup)


# --------------------------------------------------------------------------------------------------
# Attention functions with one mistake each, the kind that ships: the check must name each of them.

def _planted(**variant):
    def fn(q, k, v, *, causal=False, scale=None, return_lse=False):
        out = reference_pass(q, k, v, causal=causal, scale=scale, **variant)
        return (out["o"], out["lse"]) if return_lse else out["o"]
    return fn


def _nan_rows(q, k, v, *, causal=False, scale=None, return_lse=False):
    """The textbook softmax on masked logits: a row whose logits are all -inf gives 0/0 = NaN."""
    k, v = (x.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3) for x in (k, v))
    s = (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale) * (q @ k.transpose(-2, -1))
    if causal:
        s = s.masked_fill(~_mask(q.shape[-2], k.shape[-2], "bottom_right", s.device), float("-inf"))
    o = torch.softmax(s, dim=-1) @ v
    return (o, torch.logsumexp(s, dim=-1)) if return_lse else o


class _ReferenceForward(torch.autograd.Function):
    """The reference forward pass, saving what a planted backward needs."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        ctx.save_for_backward(q, k, v)
        ctx.causal, ctx.scale = causal, scale
        return reference_pass(q, k, v, causal=causal, scale=scale)["o"]


class _TransposedDS(_ReferenceForward):
    """Forward right; the backward uses dS^T where dS belongs (the shapes agree only when Nq == Nk)."""

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        g = reference_pass(q, k, v, do, causal=ctx.causal, scale=ctx.scale, ds_transposed=True)
        return g["dq"], g["dk"], g["dv"], None, None


def _transposed_ds(q, k, v, *, causal=False, scale=None):
    if q.shape[-2] != k.shape[-2]:
        raise NotImplementedError("this kernel needs Nq == Nk")
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    return _TransposedDS.apply(q, k, v, causal, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


class _RacyBackward(_ReferenceForward):
    """Right to the last bit but one: dK and dV add the query rows' contributions in a random order,
    as a kernel that accumulates them with atomic adds does."""

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        scale = ctx.scale
        s = scale * (q @ k.transpose(-2, -1))
        if ctx.causal:
            s = s.masked_fill(~_mask(q.shape[-2], k.shape[-2], "bottom_right", s.device), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        o = p @ v
        ds = p * (do @ v.transpose(-2, -1) - (do * o).sum(-1, keepdim=True))
        order = torch.randperm(q.shape[-2], device=q.device)          # a different order on every call
        dv = _ordered_sum(p, do, order)
        dk = scale * _ordered_sum(ds, q, order)
        return scale * (ds @ k), dk, dv, None, None


def _ordered_sum(a, b, order):
    """sum_i a[..., i, :]^T b[..., i, :] (one rank-1 term per query row), added up in ``order``."""
    total = torch.zeros(*a.shape[:-2], a.shape[-1], b.shape[-1], dtype=a.dtype, device=a.device)
    for i in order.tolist():
        total = total + a[..., i, :, None] * b[..., i, None, :]
    return total


def _racy_backward(q, k, v, *, causal=False, scale=None):
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    return _RacyBackward.apply(q, k, v, causal, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def planted_mistakes() -> dict:
    """Attention functions (attnpkg's convention) that each make one typical mistake, by what the
    check should call it: a causal mask aligned top-left, the scale dropped, grouped-query heads
    mapped h % Hkv, the lse in base 2, NaN for rows that see no key, dS transposed in the backward,
    and a backward that adds its terms in a different order on every run."""
    made = {"causal aligned top-left": _planted(alignment="top_left"),
            "scale dropped": _planted_scale_dropped,
            "grouped-query heads mapped h % Hkv": _planted(kv_heads="tiled"),
            "lse in base 2": _planted(lse_base2=True),
            "rows that see no key give NaN": _nan_rows,
            "dS transposed in the backward": _transposed_ds,
            "backward not deterministic": _racy_backward}
    for what, fn in made.items():
        fn.__name__ = fn.__qualname__ = "planted: " + what
    return made


def _planted_scale_dropped(q, k, v, *, causal=False, scale=None, return_lse=False):
    out = reference_pass(q, k, v, causal=causal, scale=1.0)
    return (out["o"], out["lse"]) if return_lse else out["o"]


# --------------------------------------------------------------------------------------------------
# Command line.

def sdpa_backends(device):
    """The SDPA backends that run on ``device`` (each probed with a small half-precision or float32 call)."""
    available = []
    for backend in ("math", "flash", "efficient", "cudnn"):
        fn = sdpa(backend)
        dtypes = [torch.float64, torch.float32, torch.float16]
        for dtype in dtypes:
            q = torch.randn(1, 1, 8, 16, device=device, dtype=dtype)
            try:
                fn(q, q, q)
                available.append(backend)
                break
            except Exception:  # noqa: BLE001
                continue
    return available


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnpkg.check",
                                     description="Check attention implementations against the mathematics.")
    parser.add_argument("target", choices=["sdpa", "attnpkg"], help="what to check")
    parser.add_argument("--backend", default="all", help="SDPA backend: math, flash, efficient, cudnn or all (default)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None,
                        help="float64, float32, bfloat16 or float16 (default: the most precise one accepted)")
    parser.add_argument("--quick", action="store_true", help="one case per check")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    reports = []
    if args.target == "sdpa":
        backends = sdpa_backends(device) if args.backend == "all" else [args.backend]
        for backend in backends:
            reports.append(attention(sdpa(backend), device=device, dtype=dtype, quick=args.quick))
    else:
        import attnpkg
        reports.append(attention(attnpkg.flash_attention, device=device, dtype=dtype, quick=args.quick,
                                 deterministic=True))
    for report in reports:
        print(report, end="\n\n")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
