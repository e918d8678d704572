"""Smoke test of the step-overhead benchmark: every method builds, runs and reports (no timing
claims: speed is measured by running the benchmark, not in tests)."""

from benchmarks import step_overhead


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
  assert result["param_bytes"] == 2 * result["num_params"]  # bfloat16 params
  for name in methods:
    assert result[f"{name}_ms"] > 0
    key = step_overhead.METHODS[name].memory_key or name
    assert result[f"{key}_temp_bytes"] >= 0 and result[f"{key}_argument_bytes"] > 0
  assert {k for k in result if k.endswith("_ratio")} == {
    "project_ratio",
    "radii_update_ratio",
    "digrap_ratio",
  }
  assert set(step_overhead.DEFAULT_METHODS) <= set(step_overhead.METHODS)


def test_lora_step_runs_and_reports_its_ratios():
  result = step_overhead.run_lora(width=8, depth=2, rank=2, batch_size=2, steps=1, warmup=0)
  for name in step_overhead.LORA_METHODS:
    assert result[f"{name}_ms"] > 0 and result[f"{name}_temp_bytes"] >= 0
  assert {k for k in result if k.endswith("_ratio")} == {
    "lora_tpgm_mars_ratio",
    "lora_tpgm_l2_ratio",
  }
  assert result["merged_flops_per_step"] == 2 * 2 * 8 * 2 * 8
