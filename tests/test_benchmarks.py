"""The side-by-side GPU benchmark keeps its contract on CPU (CI has no GPU; a lent GPU runs it once, unattended):
every variant it declares is measured without error, every JSON line carries the fields issue 6 asks for, and the
derived figures (loop/step ratio, A/1 projection, SAELens rows) follow from the measured ones."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"date", "card", "torch", "variant", "d_sae", "batch", "tokens_per_s", "peak_gpu_gb", "peak_host_gb"}

# stands in for peer-bench's bench_saelens.py: its 'training' line, echoing the size and --fast it was asked for
FAKE_SAELENS = textwrap.dedent("""
    import json, sys
    a = sys.argv
    assert a[a.index("--batch-tokens") + 1] == "256", "not the benchmark's batch"  # (an error row if not)
    print("some log line")
    print(json.dumps({"bench": "training", "d_sae": int(a[a.index("--d-sae") + 1]), "fast": "--fast" in a,
                      "end_to_end_tokens_per_s_median": 1234.4,
                      "peak_rss_mib": 100, "training_tokens": int(a[a.index("--train-tokens") + 1])}))
""")


@pytest.fixture(scope="module")
def gpu_compare_cpu(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    tmp = tmp_path_factory.mktemp("gpu_compare")
    (tmp / "bench_saelens.py").write_text(FAKE_SAELENS)
    out = tmp / "gpu.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_compare.py"), "--device", "cpu", "--d-sae", "256,512",
           "--batch", "256", "--context-len", "32", "--lm-tokens", "2048", "--seconds", "0.05", "--disk-tokens",
           "4096", "--capacity", "16384", "--saelens", str(tmp / "bench_saelens.py"), "--saelens-tokens",
           "2000000", "--text-dir", str(tmp / "text"), "--text-mb", "0.3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    return printed, written


def _declared() -> tuple[dict, tuple, str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_compare
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_compare.STEP_VARIANTS, gpu_compare.LARGE_STEP_VARIANTS, gpu_compare.BEST


def test_gpu_compare__every_variant_measured_with_the_issue_fields(gpu_compare_cpu) -> None:
    printed, written = gpu_compare_cpu
    assert printed == written  # --out gets exactly the lines printed
    errors = [(r["variant"], r["error"]) for r in printed if "error" in r]
    assert not errors
    for r in printed:
        assert FIELDS <= r.keys(), r["variant"]
        assert r["card"] == "cpu" and r["batch"] == 256
    steps, large, _ = _declared()
    got = {(r["variant"], r["d_sae"]) for r in printed}
    want = {(v, 256) for v in steps} | {(v, 512) for v in large}
    want |= {(f"lm_{kind}_ctx{ctx}", None) for kind in ("native", "tl") for ctx in (32, 128)}
    want |= {("lm_native_math_ctx32", None)}  # (sdpa_kernel forced, entered once per timed run)
    want |= {("lm_native_into_ring_ctx32", None), ("lm_native_into_chunk_ctx32", None)}
    want |= {(f"loop_cpu_ctx32{s}", 256) for s in ("", "_no_priority", "_chunk_writes", "_lm_batch_div4",
                                                    "_lm_batch_x4", "_copied_input", "_no_shuffle_metrics", "_ring_x2",
                                                    "_fp32_ring_torch_ops", "_tl",
                                                    "_text_prefetched", "_text_inline", "_ids_prefetched")}
    want |= {("loop_cpu_ctx128", 256), ("loop_cpu_ctx32", 512), ("disk_write", None), ("disk_read_train", 256),
             ("projection_paper_a1", 256), ("projection_paper_a1_text", 256), ("projection_paper_a1_ids", 256),
             ("projection_paper_a1_ring_x2", 256),
             ("saelens_trainer_fast", 256),
             ("saelens_trainer", 512)}
    assert got == want
    measured = [r for r in printed if not r["variant"].startswith("projection")]
    assert all(r["tokens_per_s"] > 0 and r["wall_s"] >= 0 for r in measured)  # (wall_s: to plan a device call)
    rows = {(r["variant"], r["d_sae"]): r for r in printed}  # the LM stored most vectors in the ring itself
    assert rows[("loop_cpu_ctx32", 256)]["direct_write_fraction"] > 0.5
    assert rows[("loop_cpu_ctx32_chunk_writes", 256)]["direct_write_fraction"] == 0
    lm_batches = [rows[(f"loop_cpu_ctx32{s}", 256)]["lm_batch_size"] for s in ("_lm_batch_div4", "", "_lm_batch_x4")]
    assert lm_batches == [16, 64, 256]  # (--lm-tokens 2048 / context 32, a quarter and 4x)
    assert rows[("loop_cpu_ctx32_ring_x2", 256)]["capacity"] == 2 * rows[("loop_cpu_ctx32", 256)]["capacity"] == 32768


def test_gpu_compare__ratios_and_projection_follow_from_the_measured_rates(gpu_compare_cpu) -> None:
    from sae_stream.config import load_config

    rows = {(r["variant"], r["d_sae"]): r for r in gpu_compare_cpu[0]}
    _, _, best = _declared()
    for d_sae in (256, 512):
        loop, step = rows[("loop_cpu_ctx32", d_sae)], rows[(best, d_sae)]
        assert loop["ratio_to_step"] == pytest.approx(loop["tokens_per_s"] / step["tokens_per_s"], abs=2e-3)
    loop, in_place = rows[("loop_cpu_ctx32", 256)], rows[(f"{best}_in_place", 256)]  # (the stricter ratio)
    assert loop["ratio_to_step_in_place"] == pytest.approx(loop["tokens_per_s"] / in_place["tokens_per_s"], abs=2e-3)
    assert not loop["into_graph_input"]  # (CPU: no graph, so no graph input to gather into)
    tokens = load_config(ROOT / "configs" / "paper_a1.yaml").train.total_tokens
    for suffix in ("", "_text", "_ids", "_ring_x2"):  # (the loop fed text, or its ids from `sae-stream tokenize`,
        # read ahead; the loop with twice the ring)
        loop = rows[("loop_cpu_ctx32" + (f"{suffix}_prefetched" if suffix in ("_text", "_ids") else suffix), 256)]
        minutes = tokens / loop["tokens_per_s"] / 60
        assert rows[("projection_paper_a1" + suffix, 256)]["minutes"] == pytest.approx(minutes, rel=1e-3, abs=0.06)


def test_gpu_compare__saelens_rows_carry_its_script_figures_and_request(gpu_compare_cpu) -> None:
    """The SAELens script is asked for the same size and batch, --fast at the first size only, and the training
    tokens halved at each larger size; its rate and host peak are reported as it measured them."""
    rows = {r["variant"]: r for r in gpu_compare_cpu[0] if r["variant"].startswith("saelens")}
    fast, plain = rows["saelens_trainer_fast"], rows["saelens_trainer"]
    assert (fast["d_sae"], plain["d_sae"]) == (256, 512)
    assert fast["tokens_per_s"] == plain["tokens_per_s"] == 1234
    assert (fast["training_tokens"], plain["training_tokens"]) == (2_000_000, 1_000_000)
    assert fast["peak_host_gb"] == pytest.approx(100 * 2**20 / 1e9, abs=1e-3) and fast["peak_gpu_gb"] is None


def test_profile_step__profiles_the_step_the_loop_and_the_lm_at_the_rate_it_reports(tmp_path: Path) -> None:
    """gpu_session.sh's kernel tables (profile_step.py reuses gpu_compare's helpers): the step, the loop and the LM
    profiled, each header's tokens/s its tokens (a batch, or a forward's) over its wall time."""
    import re

    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--device", "cpu", "--d-sae", "256",
           "--batch", "256", "--context-len", "32", "--lm-tokens", "2048", "--capacity", "16384", "--steps", "10",
           "--profiled", "3", "--rows", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    heads = re.findall(r"^== (step|loop|lm) .*?: wall (\d+) us/(\w+) \(([\d.]+)M tokens/s\).*\((\d+) profiled\)",
                       proc.stdout, re.M)
    assert [(h[0], h[2]) for h in heads] == [("step", "step"), ("lm", "forward"), ("loop", "step"), ("step", "step")]
    for (_, wall_us, _, rate_m, _), tokens in zip(heads, (256, 2048, 256, 256)):
        assert float(rate_m) == pytest.approx(tokens / (int(wall_us) * 1e-6) / 1e6, rel=0.01, abs=0.006)
    # the loop's window spans a refill (16384 x 0.5 / 256 = 32 steps), the steps' are --profiled
    assert [int(h[4]) for h in heads] == [3, 5, 32, 3]
    assert "Input Shapes" in proc.stdout and "[256, 512]" in proc.stdout  # the eager step's ops, by shape


def test_data_throughput__every_variant_measured_and_ratios_follow(tmp_path: Path) -> None:
    """gpu_session.sh's text -> token batches figures: each reader variant measured at 1 and 2 tokenizer threads,
    and the ratios taken against inline_1 of the same run (the pre-tokenized files and GPT-2 as an hf: tokenizer
    checked to give the same batches as the text through tiktoken, or the script exits non-zero)."""
    out = tmp_path / "data.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data_throughput.py"), "--tokens", "60000", "--context-len",
           "256", "--batch", "4", "--threads", "1", "2", "--repeats", "1", "--dir", str(tmp_path), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    kinds = ("tokenize_array_{}", "inline_{}", "inline_hf_{}", "prefetched_{}", "prefetched_{}_busy")
    assert rows.keys() == {"records", "tokenize_session8", "reader_ceiling", "pretokenized_jsonl_inline",
                           "pretokenized_parquet_inline"} | {k.format(t) for k in kinds for t in (1, 2)}
    assert next(iter(rows)) == "inline_1"  # rows go out as measured, the ratios' base first
    base = rows["inline_1"]["tokens_per_s"]
    # the same documents tokenized two ways: rates within a small factor (tokens counted, not documents or chunks)
    assert 0.3 < rows["tokenize_array_1"]["tokens_per_s"] / rows["tokenize_session8"]["tokens_per_s"] < 5
    for name, r in rows.items():
        assert r["rounds"] == [r["tokens_per_s"]], name
        assert r["tokens_per_s"] > 0 and r["ratio_to_inline_1"] == pytest.approx(r["tokens_per_s"] / base, abs=0.01)
        assert r["context_len"] == 256 and r["batch"] == 4 and "cores" in r["machine"]


def test_eval_memory__variants_agree_and_slices_bound_the_rows(tmp_path: Path) -> None:
    """eval_memory.py: each variant in its own process gives the same losses; `whole` unembeds a chunk's every
    position at once, a number of elements LOGIT_ELEMENTS // d_vocab positions."""
    out = tmp_path / "eval.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "eval_memory.py"), "--slices", "whole,2000000", "--context-len",
           "32", "--contexts", "3", "--batch-contexts", "2", "--d-sae", "64", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows.keys() == {"slices=whole", "slices=2000000"}
    assert rows["slices=whole"]["slice_rows"] == 2 * 32 and rows["slices=2000000"]["slice_rows"] == 2000000 // 50257
    for r in rows.values():
        assert r["tokens"] == 3 * 32 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"], rel=0.02)
        assert r["peak_host_gb"] >= r["base_host_gb"] > 0 and r["max_rel_diff"] < 1e-4
        assert r["ce_clean"] == pytest.approx(rows["slices=whole"]["ce_clean"], rel=1e-5)


def test_analysis_cost__each_variant_measured_and_the_ratio_follows(tmp_path: Path) -> None:
    """analysis_cost.py: the dashboard with and without pinned samples in one run (the ratio taken against the
    run's own steer_tokens=0), and the interval at each context count."""
    out = tmp_path / "analysis.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "analysis_cost.py"), "--features", "3", "--tokens", "1024",
           "--d-sae", "64", "--bootstrap-contexts", "10,40", "--repeats", "2", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows.keys() == {"dashboard_steer_0", "dashboard_steer_16", "bootstrap_10", "bootstrap_40"}
    base = rows["dashboard_steer_0"]["seconds"]
    for r in rows.values():
        assert len(r["rounds"]) == 2 and r["seconds"] > 0 and "cores" in r["machine"]
    for steer in (0, 16):
        r = rows[f"dashboard_steer_{steer}"]
        assert r["steer_tokens"] == steer and r["features"] == 3 and r["tokens"] == 1024
        assert r["ratio_to_steer_0"] == pytest.approx(r["seconds"] / base, abs=0.01)
    assert rows["bootstrap_40"]["contexts"] == 40 and rows["bootstrap_40"]["peak_host_gb"] > 0
