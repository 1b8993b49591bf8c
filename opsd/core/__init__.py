"""The trainer core: the components one OPD step is made of.

config (OPDConfig), trainer (OPDTrainer: generation, the token-selection seam, the loss), selection (the seam's
types and the loss normalization), losses (chunked per-token divergence), heads (the output-head projection),
models (local model loading, vocabulary checks), weighting (per-sample reward weights), trl_compat (the pinned TRL
surface). Nothing here imports the tools beside it (opsd.data, .reward, .evaluate, .compare, .plan, ...) except
`opsd.reward.get_reward_fn`, resolved lazily when a reward function is named in the config.
"""
