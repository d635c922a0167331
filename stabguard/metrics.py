"""The ``stabguard/...`` metric keys: written into the Trainer's logs by the core and the built-in guards,
read by the console, ``monitor``, ``report`` and the diagnosis. One spelling each, here; a third-party
guard that logs its own metrics names them ``stabguard/<its name>_...`` the same way.
"""

from __future__ import annotations

SKIPPED_STEPS = "stabguard/skipped_steps"  # steps a SKIP verdict dropped, since the run began (the core)
ROLLBACKS = "stabguard/rollbacks"  # steps a ROLLBACK verdict dropped and restored (the core)
NONFINITE_STEPS = "stabguard/nonfinite_steps"  # steps with a non-finite loss or gradient (nonfinite)
FP16_OVERFLOWS = "stabguard/fp16_overflows"  # of those, fp16 loss-scaler overflows (nonfinite)
GRAD_NORM_PRE_CLIP = "stabguard/grad_norm_pre_clip"  # the step's global norm before clipping (grad_norm)
GRAD_NORM_POST_CLIP = "stabguard/grad_norm_post_clip"
GRAD_NORM_MAX_SINCE_LOG = "stabguard/grad_norm_max_since_log"  # the largest pre-clip norm between log lines
GRAD_NORM_ADAPTIVE_THRESHOLD = "stabguard/grad_norm_adaptive_threshold"  # ZClip's cut (grad_norm, adaptive)
GRAD_NORM_ADAPTIVE_CLIPS = "stabguard/grad_norm_adaptive_clips"
OPTIMIZER_STATE_BYTES_PER_PARAM = "stabguard/optimizer_state_bytes_per_param"  # (optim8bit)
