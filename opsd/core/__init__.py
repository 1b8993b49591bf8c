"""The trainer core: the components one OPD step is made of.

config (OPDConfig), trainer (OPDTrainer: generation, the token-selection seam, the loss, skipped steps), selection
(the seam's types and the loss normalization), losses (chunked, fused and TRL divergence backends), estimators
(top-k and sampled-token loss supports), diagnostics (overlap diagnostics), heads (the one output-head projection),
models (local model loading, vocabulary checks), weighting (per-sample reward weights, upstream's objective),
memory (the one peak-memory helper), trl_compat (the pinned TRL surface). Nothing here imports the tools beside it
(opsd.data, .evaluate, .compare, .plan, ...) except `opsd.reward.get_reward_fn`, resolved lazily when a reward
function is named in the config.
"""
