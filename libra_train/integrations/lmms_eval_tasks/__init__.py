"""lmms-eval tasks shipped with libra-train: ``libra_qa`` (a local short-answer QA file, e.g. the demo's
held-out split). ``python -m libra_train.integrations.lmms_eval_tasks --data FILE --out DIR`` writes one."""
