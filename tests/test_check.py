"""attnpkg.check: SDPA and attnpkg pass; every planted mistake is reported as exactly that mistake."""
import subprocess
import sys

import pytest
import torch

import attnpkg
from attnpkg import check

PLANTED = check.planted_mistakes()


def test_sdpa_math_passes_and_reports_its_top_left_alignment():
    report = check.attention(torch.nn.functional.scaled_dot_product_attention)
    assert report.ok, report
    alignment = next(f for f in report.findings if f.check == "causal alignment")
    assert alignment.status == "pass" and "top-left" in alignment.message
    skipped = {f.check: f.message for f in report.skipped}
    assert "lse" in skipped["log-sum-exp"] and "top-left" in skipped["rows that see no key"]
    assert "float64" in report.setup


def test_sdpa_declared_bottom_right_fails_as_top_left():
    """The same SDPA, held to attnpkg's convention: the check names the convention it found."""
    report = check.attention(check.sdpa("math"), causal_alignment="bottom_right")
    assert report.diagnoses == {"causal aligned top-left"}, report
    assert [f.check for f in report.failures] == ["causal alignment"]


def test_undeclared_alignment_is_detected_and_reported():
    report = check.attention(check.sdpa("math"), causal_alignment=None)
    assert report.ok
    finding = next(f for f in report.findings if f.check == "causal alignment")
    assert "top-left" in finding.message and "detected" in finding.message
    report = check.attention(attnpkg.reference.attention, causal_alignment=None)
    assert report.ok and not report.skipped, report
    assert "bottom-right" in next(f for f in report.findings if f.check == "causal alignment").message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_passes_at_lower_precision(dtype):
    report = check.attention(check.sdpa("math"), dtype=dtype, quick=True)
    assert report.ok, report
    assert str(dtype).removeprefix("torch.") in report.setup


def test_reference_passes_everything():
    report = check.attention(attnpkg.reference.attention, deterministic=True)
    assert report.ok and not report.skipped, report


@pytest.mark.parametrize("mistake", list(PLANTED))
def test_planted_mistake_is_reported_for_what_it_is(mistake):
    report = check.attention(PLANTED[mistake], deterministic=True)
    assert not report.ok
    assert report.diagnoses == {mistake}, report
    assert all(f.diagnosis == mistake for f in report.failures)
    assert report.passed, "the rest of the battery still passes"


def test_failures_say_which_quantities_are_wrong():
    report = check.attention(PLANTED["lse in base 2"])
    # every case that checks the lse fails, and only the lse is wrong in each
    assert {f.check for f in report.failures} == {f.check for f in report.findings} - {"determinism"}
    assert all(f.message.startswith("lse wrong") for f in report.failures if f.check != "log-sum-exp"), report
    # with a gradient flowing into the lse, dq and dk follow the base-2 lse (dlse enters dS scaled by log2 e)
    assert next(f for f in report.failures if f.check == "log-sum-exp").message.startswith("lse, dq, dk wrong")
    report = check.attention(PLANTED["dS transposed in the backward"])
    assert all(f.message.startswith("dq, dk wrong") for f in report.failures), report
    # this one raises for Nq != Nk: those cases are skipped with the reason
    assert any("Nq == Nk" in f.message for f in report.skipped)


def test_non_determinism_is_a_note_unless_required():
    report = check.attention(PLANTED["backward not deterministic"])
    assert report.ok
    note = next(f for f in report.findings if f.check == "determinism")
    assert note.status == "note" and "differ between 3 runs" in note.message


def test_a_function_that_raises_everywhere_fails():
    def broken(q, k, v, causal=False, scale=None):
        raise RuntimeError("kernel not built")
    report = check.attention(broken)
    assert not report.ok and report.failures[0].check == "output and gradients"
    assert "kernel not built" in report.failures[0].message


def test_nan_output_is_named():
    def nan_everywhere(q, k, v, causal=False, scale=None):
        return check.reference_pass(q, k, v, causal=causal, scale=scale)["o"] * float("nan")
    report = check.attention(nan_everywhere, quick=True)
    assert "NaN or infinity" in report.diagnoses and "is NaN in" in report.failures[0].message


def test_flash_attn_layout_adapter():
    """A function of flash-attn's (B, N, H, D) layout that returns (out, lse, probs)."""
    def flash_attn_func(q, k, v, causal=False, softmax_scale=None, return_attn_probs=False):
        out = check.reference_pass(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                   scale=softmax_scale)
        o = out["o"].transpose(1, 2)
        return (o, out["lse"], None) if return_attn_probs else o
    report = check.attention(check.flash_attn_layout(flash_attn_func, lse=True), quick=True)
    assert report.ok, report
    assert next(f for f in report.findings if f.check == "log-sum-exp").status == "pass"
    wrong = check.flash_attn_layout(lambda q, k, v, causal=False, softmax_scale=None: q * 0 + v.mean(1, keepdim=True))
    assert not check.attention(wrong, quick=True).ok


def test_function_returning_o_and_lse_always():
    def o_and_lse(q, k, v, causal=False, scale=None):
        out = check.reference_pass(q, k, v, causal=causal, scale=scale, lse_base2=True)
        return out["o"], out["lse"]
    report = check.attention(o_and_lse, quick=True)
    assert report.diagnoses == {"lse in base 2"}


def test_report_renders_as_text_and_html():
    report = check.attention(PLANTED["scale dropped"], quick=True)
    text, page = str(report), report._repr_html_()
    assert "NOT OK" in text and "FAIL" in text and "scale dropped" in text
    assert "<table>" in page and "scale dropped" in page and "FAIL" in page
    with pytest.raises(AssertionError, match="scale dropped"):
        report.assert_ok()


def test_bad_alignment_argument():
    with pytest.raises(ValueError, match="causal_alignment"):
        check.attention(attnpkg.reference.attention, causal_alignment="diagonal")


def test_attnpkg_flash_attention_passes_on_the_interpreter():
    """float32 through Triton's interpreter (the kernels take no float64)."""
    report = check.attention(attnpkg.flash_attention, deterministic=True)
    assert "float32" in report.setup and not report.skipped
    assert not report.failures, report


def test_attnpkg_flash_attention_very_negative_logits():
    """The battery found NaN in dQ here (keys past Nk in the dQ pass's last tile loaded as zeros, so
    P = exp(0 - lse) overflowed): fixed in the kernel, and kept as a regression check."""
    report = check.attention(attnpkg.flash_attention, quick=False)
    finding = next(f for f in report.findings if f.case == "B=1 H=2 N=21 D=16 S~-1e3")
    assert finding.status == "pass", finding


def test_command_line():
    run = subprocess.run([sys.executable, "-m", "attnpkg.check", "sdpa", "--backend", "math", "--quick"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "sdpa[math]): OK" in run.stdout
    assert check.main(["sdpa", "--backend", "math", "--quick"]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "math"])
def testsdpa_backends_on_gpu(backend):
    if backend not in check.sdpa_backends(torch.device("cuda")):
        pytest.skip(f"SDPA's {backend} backend does not run on this GPU")
    report = check.attention(check.sdpa(backend), device="cuda")
    assert report.ok, report


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_attnpkg_on_gpu(dtype):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bfloat16 needs compute capability 8.0")
    report = check.attention(attnpkg.flash_attention, device="cuda", dtype=dtype, deterministic=True)
    unexplained = [f for f in report.failures if f.case != "B=1 H=2 N=21 D=16 S~-1e3"]
    assert not unexplained, report
