"""What gpu_check.py measures where: the configurations and parts, the shapes, steps
and time boxes of the GPU run and of its CPU dry run, and part 1's tolerance."""

from __future__ import annotations

from workload import LLAMA3_8B, TINY_LLAMA

CONFIGS = ("stock", "prefalign", "prefalign_packed")
PARTS = ("setup", "fused_vs_plain", "dpo_step", "max_length", "cce")

# What is measured where. Times are seconds; budgets are what each part may take.
SETTINGS = {
    "gpu": {
        "device": "cuda",
        "model": LLAMA3_8B,
        "seq": 2048,
        "warmup": 2,
        "steps": 3,
        "cap_gib": 24.0,
        "lengths": [3072, 4096, 6144, 8192, 12288, 16384],
        "fake_oom_above": None,
        "gc_collect_per_step": True,
        # The lm_head of the 8B shape, one pair of 2 x 2048 tokens.
        "logprob_shape": {"tokens": 4096, "hidden": 4096, "vocab": 128256},
        "budget": {
            "setup": 90,
            "fused_vs_plain": 75,
            # One configuration's worker up to the end of its timed steps (imports,
            # 8B build, NF4, 5 steps): the first guess; later ones use the longest
            # seen. Its worker may take up to dpo_main_max before it is killed.
            "dpo_main": 90,
            "dpo_main_max": 200,
            "search_max": 80,
            "cce": 60,
        },
    },
    "dry": {
        "device": "cpu",
        "model": TINY_LLAMA,
        "seq": 64,
        "warmup": 1,
        "steps": 2,
        "cap_gib": None,
        "lengths": [96, 128, 192, 256],
        # The CPU cannot run out of memory at these sizes: above this length per
        # side a step raises OutOfMemoryError after its forward (marked simulated),
        # so the search's OOM path runs too.
        "fake_oom_above": 128,
        # 0.3 s a call in a process that has TRL imported, on this CPU: skipped.
        "gc_collect_per_step": False,
        "logprob_shape": {"tokens": 256, "hidden": 64, "vocab": 1000},
        "budget": {
            "setup": 40,
            "fused_vs_plain": 40,
            "dpo_main": 12,
            "dpo_main_max": 60,
            "search_max": 10,
            "cce": 40,
        },
    },
}
# The fused path must be no less accurate than the plain one, both measured against
# fp32 from the same bf16 inputs (factor x the plain path's error + slack), and must
# stay within an absolute distance of the plain path.
TOLERANCE = {
    "dtype": "bfloat16",
    "vs_fp32_factor": 1.5,
    "vs_fp32_slack": 1e-3,
    "logps_max_abs_vs_plain": 0.25,
    "grad_rel_norm_vs_plain": 2e-2,
    "means": (
        "passed iff for the per-token log-probs max|fused-fp32| <= 1.5 x "
        "max|plain-fp32| + 1e-3 and max|fused-plain| <= 0.25 nats, and for each "
        "gradient (hidden, lm_head weight) ||fused-fp32||/||fp32|| <= 1.5 x "
        "||plain-fp32||/||fp32|| + 1e-3 and ||fused-plain||/||plain|| <= 2e-2"
    ),
}
