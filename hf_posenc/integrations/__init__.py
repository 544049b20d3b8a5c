"""Optional integrations: lm-eval model + tasks (``lm_eval_model``, ``lm_eval_cli``, ``tasks/``) and plots
(``plotting``). Nothing is imported here, so ``import hf_posenc`` never pulls in lm-eval or matplotlib."""
