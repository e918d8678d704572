"""Smoke test of the step-overhead benchmark: every method builds, runs and reports (no timing
claims: speed is measured by running the benchmark, not in tests)."""

import itertools
import pathlib
import re
import subprocess

import jax
import numpy as np
import pytest

from benchmarks import profile_step, step_overhead


def within_rounding(reported, f, values, half_ulps, reported_half_ulp):
  """Whether `reported`, f of the unrounded values rounded, can come from the rounded `values`.

  The JSON stores times to 0.01 ms: at the tests' tiny sizes (steps of about a millisecond) that
  rounding alone moves a ratio recomputed from them by up to 1 %. f is monotone in each argument
  (or bilinear), so its range over the box of values -+ half an ulp is reached at a corner.
  """
  corners = itertools.product(*[(v - h, v + h) for v, h in zip(values, half_ulps)])
  out = [f(*c) for c in corners]
  return min(out) - reported_half_ulp <= reported <= max(out) + reported_half_ulp


def test_methods_run_in_bfloat16_and_report_their_keys():
  tiny = dict(
    stage_sizes=(1,), widths=(8,), strides=(1,), stem_width=8, stem_stride=2, norm_groups=4
  )  # compiles in a fraction of the time of the full preset
  methods = ("plain", "project", "radii_update", "adam", "digrap")  # every step builder
  result = step_overhead.run(
    batch_size=2,
    steps=1,
    warmup=0,
    methods=methods,
    model="resnet_tiny",
    dtype="bfloat16",
    overrides=tiny,
  )
  assert (result["model"], result["dtype"], result["image_size"]) == ("resnet_tiny", "bfloat16", 32)
  assert result["order"] == "rotated"  # each round starts one method later
  assert result["param_bytes"] == 2 * result["num_params"]  # bfloat16 params
  for name in methods:
    assert result[f"{name}_ms"] > 0
    key = step_overhead.METHODS[name].memory_key or name
    assert result[f"{key}_temp_bytes"] >= 0 and result[f"{key}_argument_bytes"] > 0
    assert result[f"{name}_page_faults"] >= 0 and result[f"{name}_sys_ms"] >= 0
  assert all(k.startswith("MALLOC_") for k in result["malloc_env"])
  assert isinstance(result["xla_flags"], str)
  timed = {"project", "radii_update", "digrap"}  # the methods with a baseline
  assert {k for k in result if k.endswith("_ratio")} == {
    f"{m}_{kind}" for m in timed for kind in ("ratio", "paired_ratio", "traffic_floor_ratio")
  }
  for m in timed:  # one round: the paired ratio is that round's, its quartiles the same
    lo, hi = result[f"{m}_paired_ratio_iqr"]
    assert lo == hi == result[f"{m}_paired_ratio"] == pytest.approx(result[f"{m}_ratio"], abs=2e-3)
    assert result[f"{m}_paired_ratio_ci95"] == [lo, hi]
  assert set(step_overhead.DEFAULT_METHODS) <= set(step_overhead.METHODS)


def test_memory_per_parameter_the_projection_alone_and_the_bfloat16_anchor():
  tiny = dict(
    stage_sizes=(1,), widths=(8,), strides=(1,), stem_width=8, stem_stride=2, norm_groups=4
  )
  methods = ("plain", "project", "project_bf16_anchor", "project_only", "adam", "ftp", "spd")
  methods += ("sgd_only", "ftp_only", "plain_memory_schedule", "ftp_memory_schedule")
  result = step_overhead.run(
    batch_size=2, steps=1, warmup=0, methods=methods, model="resnet_tiny", overrides=tiny
  )
  n, extra = result["num_params"], "_extra_state_bytes_per_param"
  params = step_overhead.Setup("resnet_tiny", 1, "float32", tiny).params
  flags = jax.tree.leaves(step_overhead.NOT_HEAD(params))
  constrained = sum(x.size for x, f in zip(jax.tree.leaves(params), flags) if f)
  anchor = 4 * constrained / n  # float32 anchor bytes per parameter
  assert result["tpgm" + extra] == pytest.approx(anchor, abs=0.01)
  assert result["tpgm_bf16_anchor" + extra] == pytest.approx(anchor / 2, abs=0.01)
  assert result["spd" + extra] == pytest.approx(anchor, abs=0.01)  # vs Adam
  assert result["adam" + extra] == pytest.approx(4.0, abs=0.05)  # vs SGD: 2 moments - 1 trace
  assert result["ftp" + extra] > 2 * anchor  # anchor + previous displacement (+ norms)
  for key in ("tpgm", "tpgm_bf16_anchor", "adam", "ftp", "spd"):
    total = result[f"{key}_total_bytes"]
    assert total == (
      result[f"{key}_argument_bytes"]
      + result[f"{key}_output_bytes"]
      - result[f"{key}_alias_bytes"]
      + result[f"{key}_temp_bytes"]
    )
    assert isinstance(result[f"{key}_extra_bytes_per_param"], float)
  assert "project_only_ratio" not in result and result["project_alone_ratio"] > 1
  # The memory-optimized schedule: the same program's state, its ratio against its own plain
  # step, and the plain step's against the default schedule's.
  assert result["ftp_memory_schedule" + extra] == result["ftp" + extra]
  assert {"ftp_memory_schedule_ratio", "plain_memory_schedule_ratio"} <= set(result)
  setup = step_overhead.Setup("resnet_tiny", 1, "float32", tiny)
  step, args = step_overhead.METHODS["plain"].build(setup)
  # The options reach XLA ...
  with pytest.raises(jax.errors.JaxRuntimeError, match="xla_cpu_no_such_option"):
    step_overhead._compile(step, args, {"xla_cpu_no_such_option": False})
  # ... and change the program (not every option does: XLA:CPU compiles the same program
  # with xla_cpu_enable_concurrency_optimized_scheduler=False passed this way).
  default, _ = step_overhead._compile(step, args)
  memory, _ = step_overhead._compile(step, args, step_overhead.MEMORY_SCHEDULE)
  assert default.as_text() != memory.as_text()
  # Traffic: FTP reads and writes more than the plain step (anchor, previous displacement),
  # and its floor is the extra bytes at the triad's bandwidth over the plain step's time.
  assert result["memory_gbps"] > 0
  assert result["ftp_bytes_accessed"] > result["plain_bytes_accessed"] > 0
  extra = result["ftp_bytes_accessed"] - result["plain_bytes_accessed"]
  gbps, plain = result["memory_gbps"], result["plain_ms"]
  assert within_rounding(
    result["ftp_traffic_floor_ratio"],
    lambda g, p: 1 + extra / (g * 1e9) / (p / 1e3),
    (gbps, plain),
    (5e-4 * gbps, 0.005),  # memory_gbps: 4 significant digits
    5e-5,
  )
  assert "plain_traffic_floor_ratio" not in result  # a baseline has no floor of its own
  # FTP's own optimizer work run apart from the step: its update program minus SGD's.
  assert within_rounding(
    result["ftp_alone_ratio"],
    lambda p, a, b: (p + a - b) / p,
    (plain, result["ftp_only_ms"], result["sgd_only_ms"]),
    (0.005,) * 3,
    5e-5,
  )
  assert "spd_alone_ratio" not in result  # adam_only and spd_only were not run
  assert "sgd_only_extra_bytes_per_param" not in result  # a part of a step, not a step
  # Kernels: FTP's step runs more fusions than the plain step, and the update alone fewer
  # than the whole step.
  assert result["ftp_fusions"] > result["plain_fusions"] > result["sgd_only_fusions"] > 0
  assert result["plain_copies"] >= 0
  assert 0 < result["bf16_anchor_max_rel_error"] < 2**-7


def test_lora_step_runs_and_reports_its_ratios():
  result = step_overhead.run_lora(width=8, depth=2, rank=2, batch_size=2, steps=1, warmup=0)
  for name in step_overhead.LORA_METHODS:
    assert result[f"{name}_ms"] > 0 and result[f"{name}_temp_bytes"] >= 0
  assert {k for k in result if k.endswith("_ratio")} == {
    "lora_tpgm_mars_ratio",
    "lora_tpgm_l2_ratio",
  }
  assert result["merged_flops_per_step"] == 2 * 2 * 8 * 2 * 8


def test_gpu_suite_script_parses_and_names_known_methods():
  script = pathlib.Path(step_overhead.__file__).with_name("gpu_suite.sh")
  subprocess.run(["bash", "-n", str(script)], check=True)
  methods = re.search(r'^methods="([^"]+)"', script.read_text(), re.M).group(1).split(",")
  assert set(methods) <= set(step_overhead.METHODS)


def test_profile_step_attributes_kernel_time_to_each_method():
  tiny = dict(
    stage_sizes=(1,), widths=(8,), strides=(1,), stem_width=8, stem_stride=2, norm_groups=4
  )
  out = profile_step.run(
    ("plain", "adam"), steps=1, model="resnet_tiny", batch_size=2, overrides=tiny
  )
  for name in ("plain", "adam"):
    m = out["methods"][name]
    assert len(m["wall_ms"]) == 1 and m["kernel_ms"] > 0
    assert 0 <= m["convolution_share"] <= 1
    k, w = m["kernel_ms"], m["wall_ms"][0]
    assert within_rounding(m["concurrency"], lambda k, w: k / w, (k, w), (0.005, 0.005), 5e-4)
  assert profile_step.kind("ynn_fusion.12") == "ynn_fusion"


def test_median_interval_covers_the_median_as_the_binomial_says():
  x = [9.0, 2.0, 7.0, 1.0, 5.0, 3.0, 10.0, 4.0, 8.0, 6.0]
  # n = 10: ranks 2 and 9 (coverage 1 - 2 * 11 / 1024 = 97.9 %; ranks 3 and 8 give 89 %).
  assert step_overhead.median_interval(x) == (2.0, 9.0)
  assert step_overhead.median_interval([3.0]) == (3.0, 3.0)  # one round: its ratio
  assert step_overhead.median_interval([5.0, 1.0, 4.0, 2.0, 3.0]) == (1.0, 5.0)  # too few
  with pytest.raises(ValueError, match="level"):
    step_overhead.median_interval(x, level=1.0)
  # Monte Carlo oracle: the interval of 40 samples covers the true median (0 for a normal)
  # in >= 95 % of 4,000 draws, and is no wider than needed (its ranks one closer: < 95 %).
  rng = np.random.default_rng(0)
  draws = rng.standard_normal((4000, 40))
  cover = np.mean([lo <= 0 <= hi for lo, hi in map(step_overhead.median_interval, draws)])
  assert 0.95 <= cover <= 0.975  # exact: 1 - 2 P(B <= 13) = 0.9615 for n = 40
  narrower = np.mean([s[14] <= 0 <= s[25] for s in np.sort(draws, axis=1)])
  assert narrower < 0.95  # exact: 1 - 2 P(B <= 14) = 0.9193
  assert step_overhead.median_interval(draws[0]) == tuple(np.sort(draws[0])[[13, 26]])
  lo, hi = step_overhead.median_interval(np.arange(2000.0))
  half = 1.96 * np.sqrt(2000) / 2  # normal approximation of the binomial: 999.5 -+ 43.8
  assert abs(lo - (999.5 - half)) <= 2 and abs(hi - (999.5 + half)) <= 2
