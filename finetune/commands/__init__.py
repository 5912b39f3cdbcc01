"""The `finetune` commands, one module each with `add_arguments(parser)` and `run(args)`; `finetune.cli` registers them."""
