"""The jitted fixed-shape steps and the on-device loop the Engine drives.

- `state`: what every step takes (`Weights`, `Rows`, `Caches`, the static `StepSpec`) and the
  stop rule (`emit`);
- `drafts`: layer-skip and separate-model drafts;
- `decode`: prefill into a slot, the one-token step, whole-prompt logits, shape buckets;
- `speculative`: the draft / verify / accept step;
- `loop`: `run_steps`, several steps per device call.
"""
