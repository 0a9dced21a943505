from libra_train.integrations.lmms_eval_tasks.libra_qa import main

raise SystemExit(main())
